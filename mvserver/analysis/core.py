"""The analysis itself: numpy and librosa on a decoded mono signal. Runs inside the worker process only.

One short-time Fourier transform, taken in blocks of a minute (so memory does not grow with the song), feeds every
feature: a log-mel spectrogram (onset strength for the beat tracker, MFCCs for sections) and a chroma (harmonic
change for the bar phase, and sections). Then:

- **beats**: ``librosa.beat.beat_track(trim=False)`` on the onset envelope (the default trim lost beats at the
  ends), minus beats in leading or trailing silence, each then moved onto its onset in the signal (the tracker's
  frames are ~28 ms late, too coarse for frame-exact cuts); **tempo** is a least-squares fit of beat time over beat
  index, closer than librosa's coarse estimate;
- **beat evidence**: how periodic the onset envelope is at the tracked period (its normalised autocorrelation
  there, "pulse clarity"). Speech, ambient pads and silence score low; below ``MIN_PULSE_CLARITY`` the answer has
  no grid and says why. How much stronger onsets are on the beats than between them (``beat_contrast``) is
  reported too but does not decide: speech has strong onsets, and an off-beat hi-hat lowers it in real music;
- **downbeats**: the chroma change at each beat (cosine distance between the mean chroma of the beats before and
  after it). For meters 3 and 4, a Viterbi pass over the beats chooses each beat's place in the bar: a downbeat
  earns its standardised chroma change, the bar position advances by one each beat, and a jump (a beat the tracker
  added or lost) costs a penalty. The meter whose best path has the larger per-beat score wins; the margins give
  the confidences;
- **sections**: bar-synchronous chroma + MFCC, a cosine self-similarity matrix, checkerboard-kernel novelty, peaks
  as boundaries (on bar starts, so on downbeats), and sections grouped by agglomerative clustering into labels;
- **energy** (RMS in dBFS mapped to 0..1, four values a second) and **peaks** (max |sample| per bucket, for
  drawing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SR = 22050
HOP = 512
N_FFT = 2048
N_MELS = 128
BLOCK_FRAMES = 2584  # ~60 s of frames per STFT block
TEMPOGRAM_BLOCK = 2584

# Beat evidence: songs with a beat measured 0.78-0.96, ambient and speech-like ones 0.09-0.14 (bench/README.md).
MIN_PULSE_CLARITY = 0.25
MIN_BEATS = 8
SILENCE_DB = -50.0  # below the song's loudest passage: a beat there is dropped (leading/trailing only)
REFINE_BEFORE = 0.07  # seconds before a tracked beat where its onset is looked for
REFINE_AFTER = 0.02
REFINE_MIN_DB = 3.0  # a rise of high-passed energy that counts as the beat's onset
REFINE_DEFAULT_SHIFT = 0.028  # the tracker's mean lateness, used when no beat has a clear onset
JUMP_PENALTY = 3.0  # in standard deviations of chroma change: one skipped/extra beat must be worth it
ENERGY_RATE = 4  # values per second
PEAKS_RATE = 20  # values per second
PREROLL_SECONDS = 2.0  # an intro this long before the first downbeat becomes a section of its own


@dataclass
class Features:
    log_mel: np.ndarray  # (N_MELS, frames) in dB
    chroma: np.ndarray  # (12, frames), each frame max-normalised
    onset: np.ndarray  # (frames,)


def features(y: np.ndarray) -> Features:
    """Log-mel, chroma and onset strength from one centred STFT (the same frames as ``librosa.stft(center=True)``),
    taken a block at a time from ``y`` itself, so no padded copy of the whole signal is made."""
    import librosa

    frames = 1 + len(y) // HOP
    mel_fb = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS)
    chroma_fb = librosa.filters.chroma(sr=SR, n_fft=N_FFT, tuning=0.0)
    mel = np.empty((N_MELS, frames), dtype=np.float32)
    chroma = np.empty((12, frames), dtype=np.float32)
    for start in range(0, frames, BLOCK_FRAMES):
        stop = min(frames, start + BLOCK_FRAMES)
        power = np.abs(librosa.stft(_block(y, start, stop), n_fft=N_FFT, hop_length=HOP, center=False)) ** 2
        mel[:, start:stop] = mel_fb @ power
        chroma[:, start:stop] = chroma_fb @ power
    chroma /= np.maximum(chroma.max(axis=0, keepdims=True), 1e-10)
    log_mel = librosa.power_to_db(mel)
    onset = librosa.onset.onset_strength(S=log_mel, sr=SR, hop_length=HOP, n_fft=N_FFT)
    return Features(log_mel=log_mel, chroma=chroma, onset=onset)


def _block(y: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The samples under frames ``start..stop-1`` of a centred STFT: frame k covers y[k*HOP - N_FFT/2, +N_FFT),
    zeros outside the signal."""
    first = start * HOP - N_FFT // 2
    last = (stop - 1) * HOP + N_FFT // 2
    block = np.zeros(last - first, dtype=np.float32)
    a, b = max(0, first), min(len(y), last)
    if b > a:
        block[a - first : b - first] = y[a:b]
    return block


def analyse(y: np.ndarray, *, max_sections: int = 32) -> dict[str, Any]:
    """The analysis of a mono float32 signal at ``SR``, as the plain dict :class:`SongAnalysis` validates."""
    import librosa

    duration = len(y) / SR
    feats = features(y)
    result: dict[str, Any] = {
        "analyser": f"librosa {librosa.__version__}",  # type: ignore[attr-defined]  # librosa's .pyi omits it
        "duration": round(duration, 3),
        "energy": energy_curve(y),
        "peaks": waveform_peaks(y),
        "grid": None,
        "no_grid_reason": None,
    }
    grid, reason = beat_grid(y, feats)
    if grid is None:
        result["no_grid_reason"] = reason
        bounds = _block_bounds(duration, 2.0)
    else:
        result["grid"] = grid
        bounds = np.array(grid["downbeats"])
    result["sections"] = sections(feats, bounds, duration, max_sections=max_sections)
    return result


# -- beats and tempo -----------------------------------------------------------------------------------------------


def beat_grid(y: np.ndarray, feats: Features) -> tuple[dict[str, Any] | None, str | None]:
    """Beats, tempo, downbeats and meter; or None and the reason the beat evidence is too weak."""
    import librosa

    onset = feats.onset
    if not np.any(onset > 0):
        return None, "silent: no onsets"
    _, frames = librosa.beat.beat_track(
        onset_envelope=onset, sr=SR, hop_length=HOP, trim=False, bpm=global_tempo(onset)
    )
    frames = _drop_silent_ends(frames, y)
    if len(frames) < MIN_BEATS:
        return None, f"too few beats ({len(frames)})"
    period = float(np.median(np.diff(frames)))
    clarity = pulse_clarity(onset, period)
    contrast = beat_contrast(onset, frames)
    evidence = {"pulse_clarity": round(clarity, 3), "beat_contrast": round(contrast, 3)}
    if clarity < MIN_PULSE_CLARITY:
        return None, f"weak beat evidence: pulse clarity {clarity:.2f} (needs {MIN_PULSE_CLARITY})"
    times = refine_beats(y, librosa.frames_to_time(frames, sr=SR, hop_length=HOP))
    tempo = fitted_tempo(times)
    change = chroma_change(feats.chroma, frames)
    phase = bar_phase(change)
    downbeats = times[phase["downbeat_index"]]
    return {
        "tempo": round(tempo, 2),
        "beats": [round(float(t), 3) for t in times],
        "downbeats": [round(float(t), 3) for t in downbeats],
        "meter": phase["meter"],
        "beats_per_bar": phase["beats_per_bar"],
        "meter_confidence": phase["meter_confidence"],
        "downbeat_confidence": phase["downbeat_confidence"],
        "evidence": evidence,
    }, None


def global_tempo(onset: np.ndarray) -> float:
    """librosa's tempo estimate (``librosa.feature.tempo``: the mean autocorrelation tempogram under a log-normal
    prior), with the tempogram built a block of columns at a time. Whole, it is a (768 x frames) complex array:
    0.4 GB of peak memory for a 10-minute song."""
    import librosa

    win = int(librosa.time_to_frames(8.0, sr=SR, hop_length=HOP))
    padded = np.pad(onset, win // 2, mode="linear_ramp", end_values=0)  # as tempogram(center=True) pads
    total = np.zeros(win)
    for start in range(0, len(onset), TEMPOGRAM_BLOCK):
        stop = min(len(onset), start + TEMPOGRAM_BLOCK)
        block = librosa.feature.tempogram(
            onset_envelope=padded[start : stop + win - 1], sr=SR, hop_length=HOP, win_length=win, center=False
        )
        total += block.sum(axis=1)
    mean = (total / len(onset))[:, None]
    return float(librosa.feature.tempo(tg=mean, sr=SR, hop_length=HOP, aggregate=None)[0])


def _drop_silent_ends(frames: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Without ``trim``, the tracker keeps ticking through silence; drop leading and trailing beats where the audio
    around the beat is silent (``SILENCE_DB`` below the loudest beat)."""
    if len(frames) == 0:
        return frames
    half = int(0.1 * SR)
    levels = np.array([np.sqrt(np.mean(y[max(0, f * HOP - half) : f * HOP + half] ** 2) + 1e-20) for f in frames])
    db = 20 * np.log10(levels / levels.max())
    loud = np.flatnonzero(db > SILENCE_DB)
    if len(loud) == 0:
        return frames[:0]
    return frames[loud[0] : loud[-1] + 1]


def refine_beats(y: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Beat times to a few milliseconds. The tracker works on 23 ms frames of a centred log-mel flux, which puts a
    hit about one frame late (28 ms on average on synthetic drums, ±7 ms): enough to cross a 24 fps frame boundary.
    Near each beat (from ``REFINE_BEFORE`` before to ``REFINE_AFTER`` after) find the sharpest rise of
    high-passed energy on a 2.9 ms grid; where no rise of ``REFINE_MIN_DB`` is found (a soft beat), shift the
    beat by the median correction of the others."""
    step, window = 64, 128
    refined = times.copy()
    found = np.zeros(len(times), dtype=bool)
    for i, t in enumerate(times):
        onset = _onset_near(y, t, step, window)
        if onset is not None:
            refined[i], found[i] = onset, True
    shift = float(np.median(refined[found] - times[found])) if found.any() else -REFINE_DEFAULT_SHIFT
    refined[~found] = times[~found] + shift
    for i in range(1, len(refined)):  # a refinement that would crowd or reorder beats is not taken
        if refined[i] - refined[i - 1] < 0.05:
            refined[i] = max(times[i] + shift, refined[i - 1] + 0.05)
    return np.maximum(refined, 0.0)


def _onset_near(y: np.ndarray, t: float, step: int, window: int) -> float | None:
    """The time of the sharpest rise of pre-emphasised energy between ``t - REFINE_BEFORE`` and
    ``t + REFINE_AFTER``: energy in [k*step, +window) against the window just before it, on a ``step`` grid."""
    first = int((t - REFINE_BEFORE) * SR) // step * step - window
    last = int((t + REFINE_AFTER) * SR) + window
    if first < 1 or last > len(y):
        return None
    segment = y[first - 1 : last].astype(np.float64)
    power = (segment[1:] - 0.97 * segment[:-1]) ** 2
    cumulative = np.concatenate([[0.0], np.cumsum(power)])
    starts = np.arange(0, len(power) - window + 1, step)
    level = 10 * np.log10((cumulative[starts + window] - cumulative[starts]) / window + 1e-12)
    rise = level[2:] - level[:-2]  # window k against the two steps (one window) before it
    if len(rise) == 0:
        return None
    k = int(np.argmax(rise))
    if rise[k] < REFINE_MIN_DB:
        return None
    return (first + starts[k + 2]) / SR


def pulse_clarity(onset: np.ndarray, period: float) -> float:
    """The onset envelope's normalised autocorrelation at the beat period (best of the lags within 5 % of it and of
    its double): near 1 for a steady pulse, near 0 for speech or pads."""
    env = onset - onset.mean()
    denom = float(np.dot(env, env))
    if denom <= 0:
        return 0.0
    best = 0.0
    for lag in (period, 2 * period):
        for k in range(int(lag * 0.95), int(math.ceil(lag * 1.05)) + 1):
            if 0 < k < len(env):
                best = max(best, float(np.dot(env[:-k], env[k:])) / denom)
    return best


def beat_contrast(onset: np.ndarray, frames: np.ndarray) -> float:
    """Mean onset strength at the tracked beats (max within one frame) over the mean at the off-beat midpoints."""
    on = [onset[max(0, f - 1) : f + 2].max() for f in frames]
    mids = ((frames[:-1] + frames[1:]) // 2).astype(int)
    off = onset[mids]
    return float(np.mean(on) / max(float(np.mean(off)), 1e-6))


def fitted_tempo(times: np.ndarray) -> float:
    """BPM from a least-squares line through (beat index, beat time): the mean period, robust to jitter."""
    index = np.arange(len(times))
    slope = np.polyfit(index, times, 1)[0]
    return 60.0 / float(slope)


# -- downbeats and meter -------------------------------------------------------------------------------------------


def chroma_change(chroma: np.ndarray, frames: np.ndarray, span: int = 2) -> np.ndarray:
    """For each beat, the cosine distance between the mean chroma of the ``span`` beats before it and after it."""
    edges = np.concatenate([frames, [chroma.shape[1]]])
    per_beat = np.stack(
        [chroma[:, a : max(a + 1, b)].mean(axis=1) for a, b in zip(edges[:-1], edges[1:], strict=False)]
    )
    per_beat /= np.maximum(np.linalg.norm(per_beat, axis=1, keepdims=True), 1e-9)
    cum = np.vstack([np.zeros(12), np.cumsum(per_beat, axis=0)])
    n = len(frames)
    change = np.zeros(n)
    for i in range(1, n):
        before = cum[i] - cum[max(0, i - span)]
        after = cum[min(n, i + span)] - cum[i]
        denom = np.linalg.norm(before) * np.linalg.norm(after)
        change[i] = 1.0 - float(before @ after) / denom if denom > 0 else 0.0
    return change


def _viterbi_phase(score: np.ndarray, meter: int) -> tuple[np.ndarray, float]:
    """Best bar position (0 = downbeat) for each beat: a downbeat earns ``score[i]``, positions advance by one per
    beat, any other move costs ``JUMP_PENALTY``. Returns the positions and the path's total score."""
    n = len(score)
    value = np.where(np.arange(meter) == 0, score[0], 0.0)
    back = np.zeros((n, meter), dtype=int)
    for i in range(1, n):
        advance = np.roll(value, 1)  # from position p-1 to p
        jump_from = int(np.argmax(value))
        jump = value[jump_from] - JUMP_PENALTY
        take_jump = jump > advance
        back[i] = np.where(take_jump, jump_from, (np.arange(meter) - 1) % meter)
        value = np.maximum(advance, jump) + np.where(np.arange(meter) == 0, score[i], 0.0)
    positions = np.zeros(n, dtype=int)
    positions[-1] = int(np.argmax(value))
    for i in range(n - 1, 0, -1):
        positions[i - 1] = back[i, positions[i]]
    return positions, float(value.max())


def bar_phase(change: np.ndarray) -> dict[str, Any]:
    """Meter (3 or 4) and the downbeat beats from the chroma change at each beat, with confidences in 0..1."""
    std = float(change.std())
    score = (change - change.mean()) / std if std > 1e-9 else np.zeros_like(change)
    results = {}
    for meter in (3, 4):
        positions, total = _viterbi_phase(score, meter)
        # Compare meters per downbeat: a 4 path has fewer downbeats, so raw totals favour 3 on noise.
        results[meter] = (positions, total / max(1, len(score)) * meter)
    meter = 4 if results[4][1] >= results[3][1] else 3
    other = 7 - meter
    positions = results[meter][0]
    down = np.flatnonzero(positions == 0)
    on = score[down].mean() if len(down) else 0.0
    rest = score[positions != 0].mean() if np.any(positions != 0) else 0.0
    # Downbeat confidence: how far downbeats stand out, mapped to 0..1 (a separation of 2 sd or more is certain).
    downbeat_confidence = float(np.clip((on - rest) / 2.0, 0.0, 1.0))
    margin = results[meter][1] - results[other][1]
    meter_confidence = float(np.clip(margin / max(abs(results[meter][1]), 1e-9), 0.0, 1.0))
    told = meter_confidence >= 0.15 and downbeat_confidence >= 0.3
    return {
        "meter": meter if told else None,
        "beats_per_bar": meter,
        "downbeat_index": down,
        "downbeat_confidence": round(downbeat_confidence, 3),
        "meter_confidence": round(meter_confidence, 3),
    }


# -- sections ------------------------------------------------------------------------------------------------------


def _block_bounds(duration: float, seconds: float) -> np.ndarray:
    return np.arange(0.0, duration, seconds)


def sections(
    feats: Features, starts: np.ndarray, duration: float, *, half: int = 4, max_sections: int = 32
) -> list[dict[str, Any]]:
    """Sections from units starting at ``starts`` (bars, or fixed blocks without a grid): boundaries at peaks of
    checkerboard novelty on the units' self-similarity, labelled by clustering the sections' mean features."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.signal import find_peaks

    units, starts = unit_features(feats, starts)
    if len(units) < 2 * half:
        return [{"start": 0.0, "end": round(duration, 3), "label": "A", "cluster": 0}]
    novelty = checkerboard_novelty(units @ units.T, half)
    peaks, _ = find_peaks(novelty, distance=half, height=max(0.05, novelty.mean() + 0.5 * novelty.std()))
    cut_units = sorted(int(p) for p in sorted(peaks, key=lambda p: -novelty[p])[: max_sections - 1])
    bounds = [0] + cut_units + [len(units)]
    means = np.stack([units[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:], strict=False)])
    if len(means) > 1:
        clusters = fcluster(linkage(means, method="average", metric="cosine"), t=0.5, criterion="distance")
    else:
        clusters = np.array([1])
    times = [0.0] + [float(starts[u]) for u in cut_units] + [duration]
    if starts[0] >= PREROLL_SECONDS:  # a long silent or beatless intro before the first downbeat: its own section
        times.insert(1, float(starts[0]))
        clusters = np.concatenate([[clusters.max() + 1], clusters])
    return _labelled(times, clusters)


def _labelled(times: list[float], clusters: np.ndarray) -> list[dict[str, Any]]:
    """Sections between consecutive ``times``; neighbours of one cluster are merged, labels are letters in order
    of first appearance."""
    order: dict[int, int] = {}
    result: list[dict[str, Any]] = []
    for index, (a, b) in enumerate(zip(times[:-1], times[1:], strict=False)):
        cluster = order.setdefault(int(clusters[index]), len(order))
        if result and result[-1]["cluster"] == cluster:
            result[-1]["end"] = round(b, 3)
            continue
        result.append({"start": round(a, 3), "end": round(b, 3), "label": _label(cluster), "cluster": cluster})
    return result


def unit_features(feats: Features, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One unit vector per bar (or block): mean MFCCs (with the loudness term) and, at half weight, mean chroma,
    each dimension standardised over the song. A last unit shorter than half the median is dropped (the tail after
    the last downbeat). Returns the vectors and the start times of the units kept."""
    import librosa

    total = feats.onset.shape[0]
    frames = librosa.time_to_frames(starts, sr=SR, hop_length=HOP)
    keep = (frames >= 0) & (frames < total - 1)
    frames, starts = frames[keep], starts[keep]
    edges = np.concatenate([frames, [total]])
    if len(frames) > 2 and edges[-1] - edges[-2] < 0.5 * np.median(np.diff(frames)):
        frames, starts, edges = frames[:-1], starts[:-1], edges[:-1]
    if len(frames) == 0:
        return np.zeros((0, 1)), starts

    def per_unit(feature: np.ndarray, weight: float) -> np.ndarray:
        means = np.stack(
            [feature[:, a : max(a + 1, b)].mean(axis=1) for a, b in zip(edges[:-1], edges[1:], strict=False)]
        )
        means = (means - means.mean(axis=0)) / np.maximum(means.std(axis=0), 1e-9)
        return weight * means / np.sqrt(feature.shape[0])

    mfcc = librosa.feature.mfcc(S=feats.log_mel, n_mfcc=13)
    units = np.hstack([per_unit(mfcc, 1.0), per_unit(feats.chroma, 0.5)])
    units /= np.maximum(np.linalg.norm(units, axis=1, keepdims=True), 1e-9)
    return units, starts


def _label(cluster: int) -> str:
    return chr(ord("A") + cluster) if cluster < 26 else f"Z{cluster}"


def checkerboard_novelty(ssm: np.ndarray, half: int, min_side: int = 3) -> np.ndarray:
    """Foote's checkerboard novelty with a uniform (untapered) kernel of ``half`` units a side, at each boundary
    ``i`` (between units i-1 and i): similarity within the units before and within those after, minus across.
    Untapered, it equals the squared distance of the two blocks' mean vectors, so a chord progression that cycles
    within a section (every bar unlike the next) gives no novelty, while a change of texture does. Near the ends
    the kernel is cut to the units that exist (at least ``min_side`` a side) rather than zero-padded, which would
    make the ends look like boundaries."""
    n = len(ssm)
    novelty = np.zeros(n)
    for i in range(min_side, n - min_side + 1):
        before, after = slice(max(0, i - half), i), slice(i, min(n, i + half))
        within = (ssm[before, before].mean() + ssm[after, after].mean()) / 2
        novelty[i] = within - ssm[before, after].mean()
    return np.maximum(novelty, 0)


# -- energy and peaks ----------------------------------------------------------------------------------------------


def energy_curve(y: np.ndarray) -> dict[str, Any]:
    """RMS per 1/``ENERGY_RATE`` s in dBFS, mapped from -60..0 dB to 0..1."""
    size = SR // ENERGY_RATE
    means = _per_bucket(y, size, lambda v: np.einsum("ij,ij->i", v, v, dtype=np.float64) / size)
    values = np.clip((10 * np.log10(means + 1e-20) + 60) / 60, 0, 1)
    return {"rate": ENERGY_RATE, "values": [round(float(v), 3) for v in values]}


def waveform_peaks(y: np.ndarray) -> dict[str, Any]:
    """The largest |sample| per 1/``PEAKS_RATE`` s (0..1 of full scale), for drawing the waveform."""
    size = SR // PEAKS_RATE
    values = np.clip(_per_bucket(y, size, lambda v: np.maximum(v.max(axis=1), -v.min(axis=1))), 0, 1)
    return {"rate": PEAKS_RATE, "values": [round(float(v), 3) for v in values]}


def _per_bucket(y: np.ndarray, size: int, reduce: Any) -> np.ndarray:
    """``reduce`` over rows of ``size`` samples (a view, no copy of the signal); the last partial row zero-padded."""
    whole = len(y) // size
    parts = [reduce(y[: whole * size].reshape(whole, size))] if whole else []
    if len(y) > whole * size or not parts:
        parts.append(reduce(np.pad(y[whole * size :], (0, size - (len(y) - whole * size)))[None, :]))
    return np.concatenate(parts)
