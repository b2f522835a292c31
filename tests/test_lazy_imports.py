"""Processes that never call a provider (the keys CLI, ``--help``, the standalone simulator) do not import the
provider SDKs: google-genai and replicate cost every such process start-up time for nothing."""

from __future__ import annotations

import subprocess
import sys

from helpers import PROJECT

CHECK = """
import sys
import mvserver.__main__, mvserver.sandbox.__main__, mvserver.core.errors, mvserver.providers
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "replicate" or m.startswith("google.genai"))
print(loaded)
"""


def test_the_cli_and_the_simulator_load_without_the_provider_sdks() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=PROJECT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_the_app_still_maps_sdk_errors_once_the_sdks_are_loaded() -> None:
    """The errors module looks the SDKs up instead of importing them; their errors still map as before."""
    import replicate.exceptions
    from google.genai import errors as genai_errors

    from mvserver.core.errors import from_exception

    error = from_exception(replicate.exceptions.ReplicateError(status=429, detail="slow down"), "replicate")
    assert error.status == 429 and "slow down" in error.info.message
    gemini = from_exception(genai_errors.APIError(503, {"error": {"message": "busy", "status": "UNAVAILABLE"}}), "g")
    assert gemini.status == 502 and "answered 503: UNAVAILABLE: busy" in gemini.info.message  # a provider's 5xx
