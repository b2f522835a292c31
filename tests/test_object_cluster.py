"""Three real server processes on one Redis and one bucket (moto's S3 server), each with its own output and scratch
directory: no node reads another node's disk. A clip made on A is assembled elsewhere and served by C; A is killed
with SIGKILL while it downloads another clip (the job finishes on another node, and no partial object is ever in the
bucket); A's directories are then deleted and B and C still serve everything."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import LEASE, Cluster, RedisServer, make_audio, nodes_up, sim_up, state, until, with_signal
from object_store import S3Server

pytestmark = pytest.mark.cluster
PROMPT = "A night ferry crosses a bay of lanterns, one light per beat."


async def submit(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(f"{base}/api/mv/generate_video", json={"prompt": PROMPT, "duration": 4}) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["job_id"])


class ObjectCluster(Cluster):
    """A :class:`Cluster` whose nodes keep artefacts in a bucket, each node with directories of its own."""

    def __init__(self, tmp_path: Path, redis: RedisServer, settings_dir: Path, storage_env: dict[str, str]):
        super().__init__(tmp_path, redis, settings_dir)
        # No song analysis: it costs each node a worker process, and the assembly needs none.
        self.extra_env.update(storage_env, MV_ANALYSIS_WORKERS="0")

    def node_dirs(self, index: int) -> tuple[Path, Path]:
        return self.tmp_path / f"node-{index}" / "outputs", self.tmp_path / f"node-{index}" / "scratch"

    def start_node(self) -> tuple[Any, str]:
        outputs, scratch = self.node_dirs(len(self.nodes))
        self.extra_env.update(MV_OUTPUT_DIR=str(outputs), MV_SCRATCH_DIR=str(scratch))
        return super().start_node()


@pytest.fixture
async def cluster(
    tmp_path: Path, redis_server: RedisServer, cluster_settings: Path, s3_server: S3Server, s3_bucket: str
) -> Any:
    running = ObjectCluster(tmp_path, redis_server, cluster_settings, s3_server.bucket_env(s3_bucket))
    running.video_seconds = 1.0
    running.start_simulator()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def served(http: aiohttp.ClientSession, url: str) -> bytes:
    """An artefact route's answer: a redirect to the bucket, followed."""
    async with http.get(url, allow_redirects=False) as answer:
        assert answer.status == 302, await answer.text()
        assert answer.headers["Cache-Control"] == "no-store"
        location = answer.headers["Location"]
    async with http.get(location) as response:
        assert response.status == 200
        return await response.read()


def artefacts_on_disk(root: Path) -> list[str]:
    return sorted(str(p) for kind in ("videos", "images", "scenes", "audio") for p in (root / kind).glob("*"))


async def test_three_nodes_share_a_bucket_and_no_disk(
    cluster: ObjectCluster, http: aiohttp.ClientSession, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    await sim_up(http, cluster)
    [a] = await nodes_up(http, cluster, 1)
    node_a = cluster.nodes[0][0]

    song = make_audio(tmp_path / "song.wav", seconds=12.0).read_bytes()
    async with http.post(f"{a}/api/mv/upload_audio", data=song, headers={"Content-Type": "audio/wav"}) as response:
        assert response.status == 201, await response.text()
        audio_id = (await response.json())["audio_id"]
    first = await submit(http, a)  # A is the only node: A makes it
    first_state = await until(http, a, first, lambda s: s["status"] == "succeeded", timeout=60)

    # The next clip's download hangs on A; A is killed while it waits for the bytes.
    async with http.post(
        f"http://127.0.0.1:{cluster.sim_port}/_sim/faults",
        json={"route": "replicate.files.get", "kind": "hang"},
    ) as response:
        assert response.status == 200, await response.text()
    second = await submit(http, a)
    await until(http, a, second, lambda s: s["stage"] == "downloading", timeout=60)
    b, c = await nodes_up(http, cluster, 2)
    with_signal(node_a, signal.SIGKILL)
    node_a.wait(timeout=10)

    seen: list[tuple[str, int]] = []
    key = f"mv/videos/{second}.mp4"

    async def watch() -> None:  # what any reader of the bucket could see meanwhile
        while True:
            listed = s3_server.client.list_objects_v2(Bucket=s3_bucket, Prefix=key).get("Contents", [])
            seen.extend((item["Key"], item["Size"]) for item in listed)
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch())
    try:
        second_state = await until(http, b, second, lambda s: s["status"] == "succeeded", timeout=LEASE + 60)
    finally:
        watcher.cancel()
    assert {size for _, size in seen} <= {second_state["video_bytes"]}  # whole or absent, never part

    async with http.post(
        f"{b}/api/mv/assemble",
        json={"clips": [{"job_id": first}, {"job_id": second}], "audio_id": audio_id},
    ) as response:
        assert response.status == 202, await response.text()
        assembly = (await response.json())["job_id"]
    assembled = await until(http, b, assembly, lambda s: s["status"] in ("succeeded", "failed"), timeout=120)
    assert assembled["status"] == "succeeded", assembled

    # A is gone and so are its directories: B and C serve every artefact from the bucket.
    for directory in cluster.node_dirs(0):
        shutil.rmtree(directory)
    for base in (b, c):
        clip = await served(http, f"{base}/api/mv/get_video/{first}")
        assert len(clip) == first_state["video_bytes"] and clip[4:8] == b"ftyp"
        assert len(await served(http, f"{base}/api/mv/get_video/{second}")) == second_state["video_bytes"]
        assert (await served(http, f"{base}/api/mv/get_video/{assembly}"))[4:8] == b"ftyp"
        assert await served(http, f"{base}/api/mv/get_audio/{audio_id}") == song
        assert (await state(http, base, assembly))["status"] == "succeeded"
    for index in (1, 2):
        assert artefacts_on_disk(cluster.node_dirs(index)[0]) == []  # every artefact is in the bucket
    assert s3_server.leftovers(s3_bucket) == []
