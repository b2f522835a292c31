"""The settings of object storage: the local directory by default, a storage URL, scratch, links and delivery."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvserver.core.config import ConfigError, EnvSettings

MiB = 1024 * 1024


def test_storage_settings_default_to_the_local_directory() -> None:
    env = EnvSettings.from_env({})
    assert env.storage_url is None and env.scratch_dir is None
    assert env.scratch_max_bytes == 2048 * MiB and env.storage_link_ttl_seconds == 21600
    assert env.storage_delivery == "redirect"
    assert EnvSettings.from_env(
        {name: " " for name in ("MV_STORAGE_URL", "MV_SCRATCH_DIR", "MV_SCRATCH_MAX_MB", "MV_STORAGE_DELIVERY")}
    ) == EnvSettings.from_env({})


def test_storage_settings_are_read(tmp_path: Path) -> None:
    env = EnvSettings.from_env(
        {
            "MV_STORAGE_URL": "s3://bucket/some/prefix/",
            "MV_SCRATCH_DIR": str(tmp_path),
            "MV_SCRATCH_MAX_MB": "64",
            "MV_STORAGE_LINK_TTL_SECONDS": "7200",
            "MV_STORAGE_DELIVERY": "proxy",
        }
    )
    assert env.storage_url == "s3://bucket/some/prefix" and env.scratch_dir == tmp_path
    assert env.scratch_max_bytes == 64 * MiB and env.storage_link_ttl_seconds == 7200
    assert env.storage_delivery == "proxy"
    for url in ("gs://bucket", "az://container/prefix", "s3a://bucket"):
        assert EnvSettings.from_env({"MV_STORAGE_URL": url}).storage_url == url


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MV_STORAGE_URL", "/srv/outputs"),
        ("MV_STORAGE_URL", "http://bucket.example.com/prefix"),
        ("MV_STORAGE_URL", "s3://"),
        ("MV_STORAGE_URL", "s3://bucket/prefix?versionId=1"),
        ("MV_SCRATCH_MAX_MB", "0.5"),
        ("MV_STORAGE_LINK_TTL_SECONDS", "604801"),  # SigV4 links live at most 7 days
        ("MV_STORAGE_LINK_TTL_SECONDS", "an hour"),
        ("MV_STORAGE_DELIVERY", "cdn"),
    ],
)
def test_bad_storage_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        EnvSettings.from_env({name: value})
