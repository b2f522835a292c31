"""``require_or_skip``: a missing tool skips a test on a developer machine and fails it under ``CI=true``."""

from __future__ import annotations

import pytest
from helpers import CHROMIUM, PROJECT, in_ci, require_or_skip


@pytest.mark.parametrize("value", ["true", "1", "yes", "ON"])
def test_a_missing_requirement_fails_under_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="redis-server is required when CI=true"):
        require_or_skip("redis-server", False)


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_a_missing_requirement_is_a_skip_outside_ci(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="redis-server is missing"):
        require_or_skip("redis-server", False)


def test_an_available_requirement_neither_skips_nor_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require_or_skip("redis-server", True) is None


def test_ci_installs_the_chromium_the_browser_tests_check() -> None:
    """``.ci/run`` takes the path from ``helpers.CHROMIUM`` rather than spelling it again."""
    script = (PROJECT / ".ci" / "run").read_text()
    assert "from helpers import CHROMIUM" in script and str(CHROMIUM) not in script
