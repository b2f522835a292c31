"""An S3 server for the tests: moto in server mode (the real S3 wire protocol over HTTP), one per test run.

moto is the only S3 server installable here (no MinIO packages; see README "Object storage"). It speaks
multipart uploads, Range (206), conditional PUT (412) and presigned URLs, but checks neither signatures nor their
expiry, so tests assert on a presigned URL itself and follow it only to see the bytes. Its IAM auth stays off
(with it on, every presigned GET is a 500). Each test gets a bucket of its own, so no test sees another's objects.
"""

from __future__ import annotations

import importlib.util
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Credentials moto accepts (it checks none); the region every bucket is made in.
ACCESS_KEY_ID = "mvtest-access-key"
SECRET_ACCESS_KEY = "mvtest-secret-key"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    """A running moto server: its endpoint, and a boto3 client for the tests' own checks and clean-up."""

    endpoint: str
    client: Any  # boto3's S3 client

    def bucket_env(self, bucket: str, prefix: str = "mv") -> dict[str, str]:
        """The server's environment variables for storage in ``bucket`` under ``prefix``."""
        return {
            "MV_STORAGE_URL": f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_REGION": REGION,
        }

    def new_bucket(self) -> str:
        name = f"mvtest-{uuid.uuid4().hex[:16]}"
        self.client.create_bucket(Bucket=name)
        return name

    def age(self, bucket: str, key: str, seconds: float) -> None:
        """Make an object look ``seconds`` older. S3 has no call for it; moto runs in this process, so its record
        of the object is changed directly."""
        from datetime import timedelta

        from moto.s3.models import s3_backends

        for regions in s3_backends.values():
            found = regions["global"].buckets.get(bucket)
            if found is not None:
                for version in found.keys.getlist(key):
                    version.last_modified -= timedelta(seconds=seconds)
                return
        raise KeyError(bucket)

    def leftovers(self, bucket: str) -> list[str]:
        """What unfinished writes left in the bucket: staging objects and multipart uploads never completed."""
        staged = self.client.list_objects_v2(Bucket=bucket).get("Contents", [])
        uploads = self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return sorted(
            [item["Key"] for item in staged if "/.staging/" in f"/{item['Key']}"]
            + [f"upload:{item['Key']}" for item in uploads]
        )

    def abort_uploads(self, bucket: str) -> None:
        """Abort every unfinished multipart upload (what the bucket's lifecycle rule does after a day)."""
        for upload in self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            self.client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    def drop_bucket(self, name: str) -> None:
        """Delete every object, unfinished multipart upload and the bucket (moto keeps them in this process)."""
        client = self.client
        self.abort_uploads(name)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=item["Key"])
        client.delete_bucket(Bucket=name)


def moto_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("moto", "flask", "flask_cors", "boto3"))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's ``ThreadedMotoServer`` on a free port of 127.0.0.1, started once per test run (on first use)."""
    from helpers import require_or_skip

    require_or_skip('moto with its server (pip install "moto[s3]" flask flask-cors)', moto_available())
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        region_name=REGION,
    )
    try:
        yield S3Server(endpoint, client)
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket for one test; emptied and deleted afterwards."""
    name = s3_server.new_bucket()
    try:
        yield name
    finally:
        s3_server.drop_bucket(name)


@pytest.fixture
def s3_env(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> dict[str, str]:
    """The environment of an app storing its artefacts in the test's own bucket (under the prefix ``mv``), with a
    scratch directory of its own."""
    return {**s3_server.bucket_env(s3_bucket), "MV_SCRATCH_DIR": str(tmp_path / "scratch")}
