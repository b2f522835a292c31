"""Schemathesis against a real sandboxed server process: every operation of ``/api/mv/openapi.json`` is called with
bodies, paths and headers generated from the document, and every answer must match it (status code documented,
content type and body schema as documented, no 5xx, schema-valid requests accepted).

The document cannot say two things, so a 400 naming one of these generate_video fields is accepted for a
schema-valid body: a reference image must decode as a PNG, JPEG or WebP image (random base64 does not), a rules
template must be valid substitution-only Jinja2, the whole prompt (scene prompt + rendered rules) is capped, and the
replicate backend takes a reference image only for some shapes; a song upload must be an audio file ffmpeg
decodes; and an assembly's clips must be finished jobs (the first one checked is ``clips.0``). Any other 400 for
generated data is a failure.

It runs twice: as shipped (keys off), and with API keys, quotas (unlimited) and ``/metrics`` on, every call carrying a valid
bearer key (the document then has the security scheme, the signed-link parameters and 401/403/429 answers).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
import schemathesis
import yaml
from helpers import PROJECT
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from mvserver.web.access.auth import KeyLimits, create_key

EXAMPLES_PER_OPERATION = 10
UNEXPRESSIBLE = {
    "/api/mv/generate_video": {
        "reference_image_base64",
        "reference_image_id",
        "video_rules_template",
        "prompt",
        "aspect_ratio",
        "duration",
    },
    "/api/mv/upload_audio": {"body"},  # the bytes must be an audio file ffmpeg decodes
    "/api/mv/assemble": {"clips.0.job_id"},  # a clip must be a finished job (a random id is none)
    # one field needs another (the field descriptions say so; generation ignores such rules)
    "/api/mv/lipsync": {"scene_id", "video_job_id", "audio_id"},
    "/api/mv/projects": {"audio_offset", "audio_id", "character_image_id"},
    # to after from, at most report_max_days apart; a date the pattern allows may not exist (02-30)
    "/api/mv/usage": {"from", "to"},
}
# Every job-creating request: a webhook_url must name a public host (or an allowed network) and the server must have
# a signing secret for it, neither of which a schema can say.
for _path in (
    "/api/mv/generate_video",
    "/api/mv/lipsync",
    "/api/mv/assemble",
    "/api/mv/projects/{project_id}/clips",
    "/api/mv/projects/{project_id}/scenes/{scene_id}/clips",
    "/api/mv/projects/{project_id}/assemble",
    "/api/mv/projects/{project_id}/scenes/{scene_id}/lipsync",
):
    UNEXPRESSIBLE[_path] = UNEXPRESSIBLE.get(_path, set()) | {"webhook_url"}
PROVIDER_KEYS = ("GEMINI_API_KEY", "REPLICATE_API_TOKEN", "GOOGLE_VERTEX_API_KEY", "GOOGLE_CLOUD_PROJECT")


@pytest.fixture(scope="module", params=["keys_off", "keys_on"])
def server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[str, dict[str, str]]]:
    """``python -m mvserver`` in sandbox mode on a free loopback port, with instant scenes and images; with
    ``keys_on``, API keys (limits high enough never to refuse), signed links and metrics. Yields the URL and the
    headers every call sends."""
    tmp = tmp_path_factory.mktemp("conformance")
    settings_dir = tmp / "settings"
    shutil.copytree(PROJECT / "settings", settings_dir)
    sandbox = yaml.safe_load((settings_dir / "sandbox.yaml").read_text())
    sandbox.update(image_latency_seconds=0.0, scenes_latency_seconds=0.0)
    (settings_dir / "sandbox.yaml").write_text(yaml.safe_dump(sandbox))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "MV_")) and k not in PROVIDER_KEYS}
    env.update({key: "" for key in PROVIDER_KEYS})
    # videos never finish during the run: no ffmpeg work competes with the requests
    env.update(MV_OUTPUT_DIR=str(tmp / "outputs"), MV_SETTINGS_DIR=str(settings_dir), MV_SANDBOX_VIDEO_SECONDS="600")
    headers: dict[str, str] = {}
    if request.param == "keys_on":
        unlimited = KeyLimits(jobs_per_minute=None, blocking_per_minute=None, max_running_jobs=None)
        _, key = create_key(tmp / "keys.yaml", "conformance", unlimited)
        env.update(MV_API_KEYS_FILE=str(tmp / "keys.yaml"), MV_URL_SIGNING_SECRET="s" * 40, MV_METRICS="true")
        headers = {"Authorization": f"Bearer {key}"}
    log = (tmp / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mvserver", "--host", "127.0.0.1", "--port", str(port)],
        cwd=PROJECT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/mv/health", timeout=2).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()
                time.sleep(0.1)
        yield url, headers
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    assert "Traceback" not in (tmp / "server.log").read_text()


def test_the_server_conforms_to_its_openapi_document(server: tuple[str, dict[str, str]]) -> None:
    server_url, headers = server
    schema = schemathesis.openapi.from_url(f"{server_url}/api/mv/openapi.json", headers=dict(headers))
    if headers:
        document = schema.raw_schema
        assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
        assert document["security"] == [{"bearerAuth": []}] and "/metrics" in document["paths"]
    failures: list[str] = []
    calls = 0
    statuses: list[tuple[str, int]] = []

    for result in schema.get_all_operations():
        operation = result.ok()
        allowed_fields = UNEXPRESSIBLE.get(operation.path, set())

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def call(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            response = case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])
            statuses.append((operation.path, response.status_code))  # noqa: B023 - called within this iteration
            if response.status_code == 400:
                field = response.json()["error"].get("field")
                assert field in allowed_fields, f"schema-valid request refused: {response.text}"  # noqa: B023 - called within this iteration

        try:
            call()
        except Exception as exc:
            failures.append(f"{operation.label}:\n{exc}")
    assert calls >= EXAMPLES_PER_OPERATION, calls
    assert sum(200 <= status < 300 for _, status in statuses) >= 20, sorted(set(statuses))
    refused = {path for path, status in statuses if status == 401 and path != "/api/mv/webhooks/replicate"}
    assert not refused, f"a call with a valid key (or with keys off) was refused: {refused}"
    assert not failures, "\n\n".join(failures)
