"""Song analysis (``mvserver.analysis``): the grid found in small synthetic songs by the real worker process, no grid
for a song without a beat, the time limit, and the grid planner's cuts on the bar lines.

The songs are made here with numpy (kick, snare, hi-hats, a bass note and a chord per bar, chords changing on the
bar line) and written as FLAC or WAV with soundfile; their true beat times are known exactly. One warm worker pool
is shared by the module (a worker's start costs ~3 s of CPU with numba's cache, ~20 s the first time without).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from mvserver.analysis import (
    AnalysisError,
    AnalysisPool,
    AnalysisTimeout,
    PlanError,
    SongAnalysis,
    analyse_song,
    load,
    plan_scenes,
    snap,
)
from mvserver.analysis.model import ANALYSIS_VERSION

SR = 22050
CHORDS = [(57, (0, 3, 7)), (53, (0, 4, 7)), (48, (0, 4, 7)), (55, (0, 4, 7))]  # Am F C G

shared = pytest.mark.asyncio(loop_scope="module")


def _tone(midi: float, seconds: float, decay: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    freq = 440.0 * 2 ** ((midi - 69) / 12)
    wave = sum(np.sin(2 * np.pi * freq * h * t) / h for h in (1, 2, 3))
    return wave * np.exp(-decay * t) * np.minimum(1.0, t / 0.01) * np.minimum(1.0, (seconds - t) / 0.02)


def _add(out: np.ndarray, at: float, sound: np.ndarray, gain: float) -> None:
    start = int(round(at * SR))
    end = min(len(out), start + len(sound))
    out[start:end] += gain * sound[: end - start]


def drum_song(bpm: float, bars: int, meter: int = 4, intro: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples, true beat times and true downbeat times of a song in ``meter`` at ``bpm`` (the downbeats include
    the bar line that closes the last bar, where the last chord stops)."""
    rng = np.random.default_rng(int(bpm) * meter)
    period = 60.0 / bpm
    beats = intro + period * np.arange(bars * meter)
    out = np.zeros(int((beats[-1] + period + 0.5) * SR))
    t = np.arange(int(0.2 * SR)) / SR
    kick = np.sin(2 * np.pi * np.cumsum(50 + 90 * np.exp(-t * 30)) / SR) * np.exp(-t * 14)
    snare = rng.standard_normal(len(t)) * np.exp(-t * 25)
    hat = np.diff(rng.standard_normal(int(0.04 * SR) + 1)) * np.exp(-np.arange(int(0.04 * SR)) / SR * 90)
    for bar in range(bars):
        root, quality = CHORDS[bar % 4]
        start = beats[bar * meter]
        _add(out, start, sum(_tone(root + 12 + i, meter * period) for i in quality), 0.1)
        _add(out, start, _tone(root - 12, meter * period * 0.9, decay=2.0), 0.35)
        for beat in range(meter):
            at = beats[bar * meter + beat]
            _add(out, at, kick if beat == 0 or (meter == 4 and beat == 2) else snare, 0.8 if beat == 0 else 0.4)
            _add(out, at, hat, 0.2)
    bar_lines = np.append(beats[::meter], beats[-1] + period)
    return (0.8 * out / np.abs(out).max()).astype(np.float32), beats, bar_lines


def ambient_song(seconds: float) -> np.ndarray:
    """Chords swelling in and out over irregular spans, and wind noise: no beat."""
    rng = np.random.default_rng(7)
    out = np.zeros(int(seconds * SR))
    at = 0.0
    while at < seconds:
        span = rng.uniform(3.0, 7.0)
        root, quality = CHORDS[rng.integers(4)]
        pad = sum(_tone(root + 12 + i, span + 2.0) for i in quality)
        _add(out, at, pad * np.sin(np.linspace(0, np.pi, len(pad))) ** 2, 0.1)
        at += span
    out += 0.2 * np.convolve(rng.standard_normal(len(out)), np.ones(64) / 64, mode="same")
    return (0.8 * out / np.abs(out).max()).astype(np.float32)


def noise(seconds: float) -> np.ndarray:
    return (0.3 * np.random.default_rng(3).standard_normal(int(seconds * SR))).astype(np.float32)


def live_processes_of_group(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (a killed worker's ffmpeg is reaped by init, in its time)."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry))
    return alive


def write(path: Path, samples: np.ndarray) -> Path:
    import soundfile

    soundfile.write(path, samples, SR, format=path.suffix[1:].upper())
    return path


def matched(truth: np.ndarray, found: list[float], tolerance: float = 0.07) -> float:
    """The share of true times with a found time within ``tolerance`` seconds."""
    found_arr = np.array(found)
    return float(np.mean([np.min(np.abs(found_arr - t)) <= tolerance for t in truth])) if len(found_arr) else 0.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool() -> AsyncIterator[AnalysisPool]:
    analysis_pool = AnalysisPool(workers=1)
    yield analysis_pool
    await analysis_pool.close()


@pytest.fixture(scope="module")
def song_123(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray, float]:
    """10 bars of 4/4 at 123 BPM as FLAC: four bars are 7.80 s, so 8 s clips are not whole bars."""
    samples, beats, downbeats = drum_song(123, bars=10)
    path = write(tmp_path_factory.mktemp("songs") / "song123.flac", samples)
    return path, beats, downbeats, len(samples) / SR


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def analysis_123(pool: AnalysisPool, song_123: tuple[Path, np.ndarray, np.ndarray, float]) -> SongAnalysis:
    return await pool.analyse(song_123[0], timeout=60)


# -- the analysis ----------------------------------------------------------------------------------------------


@shared
async def test_a_drum_song_gets_its_beats_downbeats_tempo_and_meter(
    analysis_123: SongAnalysis, song_123: tuple[Path, np.ndarray, np.ndarray, float]
) -> None:
    _, beats, downbeats, duration = song_123
    grid = analysis_123.grid
    assert grid is not None, analysis_123.no_grid_reason
    assert abs(grid.tempo - 123) / 123 < 0.02
    assert matched(beats[2:], grid.beats) >= 0.95  # the tracker may settle during the first second
    assert matched(downbeats[1:-1], grid.downbeats) == 1.0
    assert grid.meter == 4 and grid.beats_per_bar == 4
    assert abs(analysis_123.duration - duration) < 0.05
    sections = analysis_123.sections
    assert sections[0].start == 0 and abs(sections[-1].end - analysis_123.duration) < 1e-3
    assert all(a.end == b.start for a, b in zip(sections, sections[1:], strict=False))
    assert len(analysis_123.energy.values) == pytest.approx(duration * analysis_123.energy.rate, abs=1)
    assert len(analysis_123.peaks.values) == pytest.approx(duration * analysis_123.peaks.rate, abs=1)
    assert max(analysis_123.peaks.values) == pytest.approx(0.8, abs=0.02)


@shared
async def test_a_waltz_in_wav_is_three_four(tmp_path: Path) -> None:
    """Also the one-off path: without a pool, a worker is started for the song and stopped after it."""
    samples, beats, downbeats = drum_song(100, bars=8, meter=3)
    analysis = await analyse_song(write(tmp_path / "waltz.wav", samples), timeout=60)
    assert analysis.grid is not None and analysis.grid.meter == 3
    assert matched(downbeats[1:-1], analysis.grid.downbeats) == 1.0


@shared
async def test_a_song_without_a_beat_reports_no_grid(pool: AnalysisPool, tmp_path: Path) -> None:
    analysis = await analyse_song(write(tmp_path / "ambient.flac", ambient_song(20.0)), timeout=60, pool=pool)
    assert analysis.grid is None
    assert analysis.no_grid_reason and "weak beat evidence" in analysis.no_grid_reason
    assert analysis.sections[0].start == 0 and analysis.sections[-1].end == pytest.approx(20.0, abs=0.01)
    windows = plan_scenes(analysis, analysis.duration, (4, 6, 8), 24)  # plain length sizing
    assert [w.duration for w in windows] == [8, 8, 4] and [w.cut for w in windows] == ["time", "time", "end"]


@shared
async def test_a_file_that_is_not_audio_is_an_error_and_the_worker_stays(pool: AnalysisPool, tmp_path: Path) -> None:
    await pool.analyse(write(tmp_path / "warm.wav", ambient_song(2.0)), timeout=60)
    before = pool.pids()
    bogus = tmp_path / "bogus.mp3"
    bogus.write_bytes(b"not audio at all" * 100)
    with pytest.raises(AnalysisError) as caught:
        await pool.analyse(bogus, timeout=60)
    assert caught.value.kind == "decode"
    assert pool.pids() == before


@shared
async def test_the_time_limit_kills_a_slow_analysis(pool: AnalysisPool, tmp_path: Path) -> None:
    """Three minutes of noise take far longer than 0.2 s: the worker's process group (worker and ffmpeg) is
    killed, and the next song gets a fresh worker."""
    long_song = write(tmp_path / "long.wav", noise(180.0))
    await pool.analyse(write(tmp_path / "warm.wav", ambient_song(2.0)), timeout=60)
    [worker] = pool.pids()
    started = time.monotonic()
    with pytest.raises(AnalysisTimeout):
        await pool.analyse(long_song, timeout=0.2)
    assert time.monotonic() - started < 2.0
    assert pool.pids() == [] and pool.stats.killed >= 1
    assert live_processes_of_group(worker) == []
    samples, _, _ = drum_song(120, bars=6)
    after = await pool.analyse(write(tmp_path / "after.flac", samples), timeout=60)
    assert after.grid is not None and pool.pids() != [worker]


@shared
async def test_a_cancelled_caller_kills_the_busy_worker(pool: AnalysisPool, tmp_path: Path) -> None:
    long_song = write(tmp_path / "long.wav", noise(180.0))
    task = asyncio.create_task(pool.analyse(long_song, timeout=60))
    while not pool._busy:  # a worker is started and warm before it takes the song
        await asyncio.sleep(0.02)
    [worker] = pool.pids()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.pids() == [] and live_processes_of_group(worker) == []


def test_the_analysis_is_versioned_json(analysis_123: SongAnalysis) -> None:
    data = json.loads(analysis_123.model_dump_json())
    assert data["version"] == ANALYSIS_VERSION
    assert load(data) == analysis_123
    assert load({**data, "version": ANALYSIS_VERSION + 1}) is None  # stale: computed again on first use
    assert load({**data, "grid": None}) is None  # no grid needs its reason


# -- the grid planner -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [24.0, 25.0, 30000 / 1001])
def test_planned_cuts_land_on_the_true_downbeats(
    analysis_123: SongAnalysis, song_123: tuple[Path, np.ndarray, np.ndarray, float], fps: float
) -> None:
    _, _, downbeats, duration = song_123
    windows = plan_scenes(analysis_123, duration, (4, 6, 8), fps)
    total = math.ceil(duration * fps - 1e-6)
    assert windows[0].start_frame == 0 and windows[-1].end_frame == total
    assert all(a.end_frame == b.start_frame for a, b in zip(windows, windows[1:], strict=False))
    assert all(w.duration in (4, 6, 8) and w.frames <= w.duration * fps + 1e-6 for w in windows)
    cuts = [w.end_frame / fps for w in windows[:-1]]
    assert len(cuts) >= 2
    for cut in cuts:
        assert np.min(np.abs(downbeats - cut)) <= 1 / fps, cut
    assert all(w.cut == "downbeat" for w in windows[:-1])
    # 8 s is not whole bars here: a cut at 8 s (today's sizing) would fall 0.2 s after the bar line.
    assert np.min(np.abs(downbeats - 8.0)) > 0.15
    assert any(w.frames < w.duration * fps - 1 for w in windows[:-1])  # a clip trimmed to the bar line
    for w in windows:  # the bar range counts the true bar lines inside the window
        inside = (downbeats >= w.start - 1 / fps) & (downbeats < w.end - 1 / fps)
        assert w.end_bar - max(w.first_bar, 0) == np.sum(inside)


def _analysis(bpm: float, bars: int, section_bars: list[int], meter: int = 4) -> SongAnalysis:
    period = 60.0 / bpm
    beats = [round(i * period, 3) for i in range(bars * meter)]
    downbeats = beats[::meter]
    duration = round(bars * meter * period, 3)
    starts = [downbeats[b] for b in section_bars]
    sections = [
        {"start": a, "end": b, "label": "AB"[i % 2], "cluster": i % 2}
        for i, (a, b) in enumerate(zip(starts, starts[1:] + [duration], strict=False))
    ]
    return SongAnalysis.model_validate(
        {
            "analyser": "test",
            "duration": duration,
            "no_grid_reason": None,
            "sections": sections,
            "grid": {
                "tempo": bpm,
                "beats": beats,
                "downbeats": downbeats,
                "meter": meter,
                "beats_per_bar": meter,
                "meter_confidence": 1.0,
                "downbeat_confidence": 1.0,
                "evidence": {"pulse_clarity": 0.9, "beat_contrast": 5.0},
            },
            "energy": {"rate": 4, "values": []},
            "peaks": {"rate": 20, "values": []},
        }
    )


def test_the_plan_cuts_at_section_boundaries() -> None:
    """120 BPM, bars of 2 s, sections at bars 0 and 6: plain phrases would cut at 8 and 16 s, the plan cuts at 12."""
    analysis = _analysis(120, 16, [0, 6])
    windows = plan_scenes(analysis, analysis.duration, (4, 6, 8), 24)
    assert 12.0 in [w.end for w in windows]
    assert all(analysis.sections[w.section].start <= w.start < analysis.sections[w.section].end for w in windows)
    assert [w.section_label for w in windows if w.start >= 12] == ["B"] * sum(w.start >= 12 for w in windows)


def test_bars_longer_than_the_longest_clip_are_cut_on_beats() -> None:
    analysis = _analysis(25, 4, [0])  # a bar is 9.6 s
    windows = plan_scenes(analysis, analysis.duration, (4, 6, 8), 24)
    assert all(w.frames <= 8 * 24 for w in windows)
    assert {w.cut for w in windows[:-1]} <= {"downbeat", "beat"} and "beat" in {w.cut for w in windows}


def test_plain_sizing_without_a_grid_matches_the_length_sizing() -> None:
    from mvserver.projects.service import size_to_song

    for length in (3.0, 8.0, 20.0, 23.5, 61.2):
        windows = plan_scenes(None, length, (4, 6, 8), 24)
        assert [w.duration for w in windows] == size_to_song(length, (4, 6, 8), 100)
        assert windows[-1].end == pytest.approx(length, abs=1 / 24)


def test_too_many_scenes_is_a_plan_error() -> None:
    analysis = _analysis(120, 16, [0])
    with pytest.raises(PlanError) as caught:
        plan_scenes(analysis, analysis.duration, (4, 6, 8), 24, scenes_max=3)
    assert caught.value.needed == 4


def test_an_offset_plans_from_the_offset_on_the_bars() -> None:
    analysis = _analysis(120, 16, [0])
    windows = plan_scenes(analysis, analysis.duration, (4, 6, 8), 24, offset=3.0)
    assert windows[0].start == 3.0 and windows[0].start_frame == 0
    assert all((w.end - 0.0) % 2.0 == pytest.approx(0.0, abs=1e-6) for w in windows[:-1])  # bar lines


def test_snap_moves_a_time_to_the_nearest_beat_or_bar() -> None:
    analysis = _analysis(120, 4, [0])  # beats every 0.5 s, bars every 2 s
    assert snap(3.3, analysis, "beat") == 3.5
    assert snap(3.3, analysis, "bar") == 4.0
    assert snap(0.9, analysis, "bar") == 0.0
    assert snap(3.3, analysis, "none") == 3.3
    assert snap(3.3, None, "beat") == 3.3
