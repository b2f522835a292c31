"""Three real server processes on one Redis and one bucket (moto's S3 server), each with its own output and scratch
directory: no node reads another node's disk. A clip made on A is assembled elsewhere and served by C; A is killed
with SIGKILL in the middle of another clip's body, its multipart upload of it under way (the job finishes on another
node with the whole clip, and no partial object is ever in the bucket); A's directories are then deleted and B and C
still serve everything."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import LEASE, Cluster, RedisServer, make_audio, nodes_up, sim_up, state, until, with_signal
from object_store import S3Server

from mvserver.core.objects import PART_SIZE

pytestmark = pytest.mark.cluster
PROMPT = "A night ferry crosses a bay of lanterns, one light per beat."
# Every clip the simulator renders is padded past one multipart part, so storing it is a staged multipart upload;
# the killed download stalls after a part and a bit, with that upload under way.
PADDED_CLIP = PART_SIZE + 2 * 1024 * 1024
STALL_AFTER = PART_SIZE + 1024 * 1024


async def submit(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(f"{base}/api/mv/generate_video", json={"prompt": PROMPT, "duration": 4}) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["job_id"])


class ObjectCluster(Cluster):
    """A :class:`Cluster` whose nodes keep artefacts in a bucket, each node with directories of its own."""

    def __init__(self, tmp_path: Path, redis: RedisServer, settings_dir: Path, storage_env: dict[str, str]):
        super().__init__(tmp_path, redis, settings_dir)
        # No song analysis: the assembly needs none, and it spares node A a worker process. It was turned off when
        # this test's assembly hung in 3 of 46 runs under load with analysis on, but analysis is not the cause: only
        # node A (killed before the assembly) ever starts a worker, 60 runs with it on did not hang, and one of about
        # 65 runs with it off did (under load). The cause was not found. One candidate is gone: ffmpeg was started by
        # fork + preexec_fn, which Python documents as unsafe with threads (obstore's runtime and the executor run
        # some) and during which the parent waits for the child's exec; ffmpeg now starts by vfork + exec through
        # setpriv. A timeout of the assembly fails with every live node's Python stacks (SIGUSR1), so a next hang
        # can be read.
        self.extra_env.update(storage_env, MV_ANALYSIS_WORKERS="0")
        self.sim_args = ["--output-pad-bytes", str(PADDED_CLIP)]

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


async def stalled_mid_upload(http: aiohttp.ClientSession, cluster: ObjectCluster, s3: S3Server, bucket: str) -> None:
    """Until the simulator has sent a clip's first bytes and stalled, and the bucket shows the multipart upload that
    the node downloading it began (its first part is in it)."""
    async with asyncio.timeout(60):
        while True:
            async with http.get(f"http://127.0.0.1:{cluster.sim_port}/_sim/faults") as response:
                stalls = [fault for fault in (await response.json())["applied"] if fault["kind"] == "stall"]
            uploads = s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            if stalls and uploads:
                assert stalls[0]["bytes_sent"] == STALL_AFTER < stalls[0]["size"]
                return
            await asyncio.sleep(0.05)


def simulator_output(cluster: ObjectCluster, prediction_id: str) -> bytes:
    """The clip the simulator rendered for a prediction (what every download of it serves)."""
    record = cluster.predictions()[prediction_id]
    return (cluster.sim_dir / "files" / prediction_id / record["output"]).read_bytes()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def stacks(cluster: ObjectCluster, index: int) -> str:
    """What node ``index`` writes to its log on SIGUSR1: every thread's Python stack (faulthandler)."""
    log = cluster.tmp_path / f"node-{index}.log"
    start = log.stat().st_size
    with_signal(cluster.nodes[index][0], signal.SIGUSR1)
    async with asyncio.timeout(10):
        while "(most recent call first)" not in (written := log.read_bytes()[start:].decode(errors="replace")):
            await asyncio.sleep(0.05)
    return written


async def diagnosis(http: aiohttp.ClientSession, cluster: ObjectCluster, base: str, job_id: str) -> str:
    """A stuck job's state as ``base`` shows it and the stacks of every live node."""
    parts = []
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            parts.append(repr(await state(http, base, job_id)))
    for index, (process, _) in enumerate(cluster.nodes):
        if process.poll() is None:
            with contextlib.suppress(TimeoutError):
                parts.append(f"node {index}:\n{await stacks(cluster, index)}")
    return "\n".join(parts)


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

    # The next clip's body stalls after more than one part: A is killed with its staging upload under way.
    async with http.post(
        f"http://127.0.0.1:{cluster.sim_port}/_sim/faults",
        json={"route": "replicate.files.get", "kind": "stall", "after_bytes": STALL_AFTER, "seconds": 3600},
    ) as response:
        assert response.status == 200, await response.text()
    second = await submit(http, a)
    key = f"mv/videos/{second}.mp4"
    seen: list[tuple[str, int]] = []

    async def watch() -> None:  # what any reader of the bucket could see meanwhile
        while True:
            listed = s3_server.client.list_objects_v2(Bucket=s3_bucket, Prefix=key).get("Contents", [])
            seen.extend((item["Key"], item["Size"]) for item in listed)
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch())
    try:
        await stalled_mid_upload(http, cluster, s3_server, s3_bucket)
        with_signal(node_a, signal.SIGKILL)
        node_a.wait(timeout=10)
        b, c = await nodes_up(http, cluster, 2)
        second_state = await until(http, b, second, lambda s: s["status"] == "succeeded", timeout=LEASE + 60)
    finally:
        watcher.cancel()
    rendered = simulator_output(cluster, second_state["provider_prediction_id"])
    assert second_state["video_bytes"] == len(rendered) > STALL_AFTER
    assert {size for _, size in seen} <= {len(rendered)}  # whole or absent, never part
    # A's unfinished multipart upload is all it left: invisible to readers (no object, no listing), under a staging
    # key and never the clip's own; the bucket's lifecycle rule aborts it (impl-notes §19). B's own staging is gone.
    [abandoned] = s3_server.leftovers(s3_bucket)
    assert abandoned.startswith("upload:mv/.staging/"), abandoned
    s3_server.abort_uploads(s3_bucket)

    async with http.post(
        f"{b}/api/mv/assemble",
        json={"clips": [{"job_id": first}, {"job_id": second}], "audio_id": audio_id},
    ) as response:
        assert response.status == 202, await response.text()
        assembly = (await response.json())["job_id"]
    try:
        assembled = await until(http, b, assembly, lambda s: s["status"] in ("succeeded", "failed"), timeout=120)
    except TimeoutError:
        pytest.fail(f"the assembly did not end: {await diagnosis(http, cluster, b, assembly)}")
    assert assembled["status"] == "succeeded", assembled

    # A is gone and so are its directories: B and C serve every artefact from the bucket.
    for directory in cluster.node_dirs(0):
        shutil.rmtree(directory)
    for base in (b, c):
        clip = await served(http, f"{base}/api/mv/get_video/{first}")
        assert len(clip) == first_state["video_bytes"] and clip[4:8] == b"ftyp"
        assert sha256(await served(http, f"{base}/api/mv/get_video/{second}")) == sha256(rendered)
        assert (await served(http, f"{base}/api/mv/get_video/{assembly}"))[4:8] == b"ftyp"
        assert await served(http, f"{base}/api/mv/get_audio/{audio_id}") == song
        assert (await state(http, base, assembly))["status"] == "succeeded"
    for index in (1, 2):
        assert artefacts_on_disk(cluster.node_dirs(index)[0]) == []  # every artefact is in the bucket
    assert s3_server.leftovers(s3_bucket) == []
    # A live node dumps its threads' stacks on SIGUSR1 (what a hang's diagnosis reads) and keeps serving.
    assert "(most recent call first)" in await stacks(cluster, 1)
    assert (await state(http, b, assembly))["status"] == "succeeded"
