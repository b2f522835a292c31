"""Synthetic songs with a known grid, for ``bench.beats``: drums, bass and chords at a given tempo and meter.

Everything is made with numpy at 44.1 kHz mono: a kick (a decaying sine sweep), a snare (a noise burst with a
tone), hi-hats on the eighths (optionally swung), a bass note on each downbeat and a chord pad held for the bar.
Chords change on the bar line, as in most songs; sections ("A", "B", ...) have their own progression, register,
timbre, drum density and (in "B") a lead line, so their boundaries are audible. The true beat times (and so bar
starts and section starts) come from the same tempo curve that places the notes, so a slow tempo drift or a silent
intro moves the truth with the sound. Two songs without a beat are made too: an ambient pad whose chords fade in
and out at irregular times, and speech-like babble (voiced syllables at random intervals).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SR = 44100
# Chord roots (MIDI) and qualities per section; chords change each bar.
PROGRESSIONS = {
    "A": [(57, "m"), (53, "M"), (48, "M"), (55, "M")],  # Am F C G
    "B": [(53, "M"), (55, "M"), (52, "m"), (57, "m")],  # F G Em Am
    "C": [(50, "m"), (55, "M"), (48, "M"), (45, "m")],  # Dm G C Am (lower)
}
QUALITY = {"M": (0, 4, 7), "m": (0, 3, 7)}
# How each section sounds: verse-like "A" sparse, chorus-like "B" busy and bright with a lead, bridge-like "C" low
# and dark. Real sections differ this way (instruments come and go) more than by harmony alone.
SECTION_STYLE = {
    "A": {"octave": 12, "harmonics": 2, "pad": 0.08, "busy": False, "snare": 0.6, "lead": False},
    "B": {"octave": 12, "harmonics": 6, "pad": 0.14, "busy": True, "snare": 1.0, "lead": True},
    "C": {"octave": 0, "harmonics": 3, "pad": 0.12, "busy": True, "snare": 0.5, "lead": False},
}


@dataclass
class Song:
    """A rendered song and its true grid (seconds)."""

    name: str
    samples: np.ndarray
    tempo: float | None  # mean BPM of the true beats (None: no beat)
    meter: int | None
    beats: np.ndarray = field(default_factory=lambda: np.zeros(0))
    downbeats: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sections: np.ndarray = field(default_factory=lambda: np.zeros(0))  # section start times, first one included

    @property
    def duration(self) -> float:
        return len(self.samples) / SR


def _tone(freq: float, seconds: float, harmonics: int = 4, decay: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    wave = sum(np.sin(2 * np.pi * freq * h * t) / h for h in range(1, harmonics + 1))
    env = np.exp(-decay * t) if decay else np.ones_like(t)
    attack = min(len(t), int(0.01 * SR))
    env[:attack] *= np.linspace(0, 1, attack)
    release = min(len(t), int(0.03 * SR))
    env[len(t) - release :] *= np.linspace(1, 0, release)
    return wave * env


def _midi(note: float) -> float:
    return 440.0 * 2 ** ((note - 69) / 12)


def _kick(rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.25 * SR)) / SR
    freq = 50 + 90 * np.exp(-t * 30)
    return np.sin(2 * np.pi * np.cumsum(freq) / SR) * np.exp(-t * 14)


def _snare(rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.18 * SR)) / SR
    return (0.7 * rng.standard_normal(len(t)) + 0.4 * np.sin(2 * np.pi * 190 * t)) * np.exp(-t * 25)


def _hat(rng: np.random.Generator) -> np.ndarray:
    n = int(0.05 * SR)
    noise = np.diff(rng.standard_normal(n + 1))  # crude high-pass
    return noise * np.exp(-np.arange(n) / SR * 90) * 0.5


def _add(out: np.ndarray, at: float, sound: np.ndarray, gain: float) -> None:
    start = int(round(at * SR))
    if start >= len(out):
        return
    end = min(len(out), start + len(sound))
    out[start:end] += gain * sound[: end - start]


def beat_times(bars: int, meter: int, bpm: float, bpm_end: float | None, start: float) -> np.ndarray:
    """Beat times for a tempo that moves linearly from ``bpm`` to ``bpm_end`` over the song (one more beat than the
    song has, so the last bar has an end)."""
    count = bars * meter + 1
    tempi = np.linspace(bpm, bpm_end or bpm, count)
    periods = 60.0 / tempi
    return start + np.concatenate([[0.0], np.cumsum(periods[:-1])])


def drum_song(
    name: str,
    *,
    bpm: float,
    meter: int = 4,
    form: str = "ABAB",
    bars_per_section: int = 8,
    swing: float = 0.5,
    intro: float = 0.0,
    bpm_end: float | None = None,
    seed: int = 0,
) -> Song:
    """A song in ``meter`` at ``bpm`` (drifting to ``bpm_end``), sections in ``form`` of ``bars_per_section`` bars.
    ``swing`` is where the off-beat eighth falls within the beat (0.5 straight, 0.62-0.67 swung)."""
    rng = np.random.default_rng(seed)
    bars = len(form) * bars_per_section
    times = beat_times(bars, meter, bpm, bpm_end, intro)
    end = times[-1] + 1.0
    out = np.zeros(int(end * SR))
    kick, snare, hat = _kick(rng), _snare(rng), _hat(rng)
    for bar in range(bars):
        part = form[bar // bars_per_section]
        style = SECTION_STYLE[part]
        root, quality = PROGRESSIONS[part][bar % 4]
        start, stop = times[bar * meter], times[(bar + 1) * meter]
        chord = sum(
            _tone(_midi(root + style["octave"] + i), stop - start, style["harmonics"]) for i in QUALITY[quality]
        )
        _add(out, start, chord, style["pad"])
        _add(out, start, _tone(_midi(root - 12), (stop - start) * 0.9, 3, decay=2.0), 0.35)
        for beat in range(meter):
            at = times[bar * meter + beat]
            period = times[bar * meter + beat + 1] - at
            if beat == 0 or (meter == 4 and beat == 2 and style["busy"]):
                _add(out, at, kick, 0.9)
            else:
                _add(out, at, snare, (0.45 if meter == 4 else 0.25) * style["snare"])
            _add(out, at, hat, 0.25)
            if style["busy"]:
                _add(out, at + swing * period, hat, 0.18)
            if style["lead"]:  # a melody note per beat from the chord, an octave up
                note = root + 24 + QUALITY[quality][beat % 3]
                _add(out, at, _tone(_midi(note), period * 0.8, 5, decay=3.0), 0.08)
    beats = times[:-1]
    return Song(
        name,
        _normalise(out),
        tempo=float(60.0 / np.mean(np.diff(times))),
        meter=meter,
        beats=beats,
        downbeats=beats[::meter],
        sections=beats[:: meter * bars_per_section],
    )


def ambient_song(name: str, seconds: float = 60.0, seed: int = 1) -> Song:
    """Pads that swell in and out over irregular spans (4-9 s) and some wind noise: no beat at all."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * SR))
    at = 0.0
    while at < seconds:
        span = rng.uniform(4.0, 9.0)
        root, quality = PROGRESSIONS["A"][rng.integers(4)]
        tone = sum(_tone(_midi(root + 12 + i), span + 2.0, 2) for i in QUALITY[quality])
        swell = np.sin(np.linspace(0, np.pi, len(tone))) ** 2
        _add(out, at, tone * swell, 0.12)
        at += span
    wind = np.convolve(rng.standard_normal(len(out)), np.ones(64) / 64, mode="same")
    out += 0.2 * wind * (0.6 + 0.4 * np.sin(2 * np.pi * np.arange(len(out)) / SR / 7.3))
    return Song(name, _normalise(out), tempo=None, meter=None)


def speech_song(name: str, seconds: float = 60.0, seed: int = 2) -> Song:
    """Voiced "syllables" (a gliding harmonic tone with a noisy onset) of random length at random intervals, in
    phrases separated by pauses: onsets everywhere, but no regular pulse."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * SR))
    at = 0.2
    while at < seconds:
        for _ in range(rng.integers(3, 12)):
            length = rng.uniform(0.08, 0.35)
            t = np.arange(int(length * SR)) / SR
            pitch = rng.uniform(100, 220) * (1 + 0.15 * np.sin(2 * np.pi * t / length * rng.uniform(0.3, 1.0)))
            phase = 2 * np.pi * np.cumsum(pitch) / SR
            voiced = sum(np.sin(h * phase) / h for h in range(1, 8)) * np.sin(np.pi * t / length)
            voiced[: int(0.02 * SR)] += 0.3 * rng.standard_normal(min(len(t), int(0.02 * SR)))
            _add(out, at, voiced, 0.3)
            at += length + rng.uniform(0.03, 0.25)
        at += rng.uniform(0.3, 1.2)
    return Song(name, _normalise(out), tempo=None, meter=None)


def _normalise(out: np.ndarray) -> np.ndarray:
    return (0.8 * out / (np.max(np.abs(out)) + 1e-9)).astype(np.float32)


def suite(seconds_scale: float = 1.0) -> list[Song]:
    """The benchmark's songs: several tempi and both meters, swing, a silent intro, a slow drift, and two songs
    without a beat. ``seconds_scale`` < 1 shortens them (fewer bars per section) for a quick run."""
    bars = max(2, round(8 * seconds_scale))
    return [
        drum_song("4/4 90 BPM", bpm=90, bars_per_section=bars, seed=10),
        drum_song("4/4 123 BPM", bpm=123, bars_per_section=bars, seed=11),
        drum_song("4/4 140 BPM", bpm=140, form="ABCAB", bars_per_section=bars, seed=12),
        drum_song("3/4 100 BPM", bpm=100, meter=3, bars_per_section=bars, seed=13),
        drum_song("3/4 150 BPM", bpm=150, meter=3, form="ABCAB", bars_per_section=bars, seed=14),
        drum_song("4/4 118 BPM swing", bpm=118, swing=0.66, bars_per_section=bars, seed=15),
        drum_song("4/4 110 BPM, 6 s silent intro", bpm=110, intro=6.0, bars_per_section=bars, seed=16),
        drum_song("4/4 120→128 BPM drift", bpm=120, bpm_end=128, form="ABCAB", bars_per_section=bars, seed=17),
        ambient_song("ambient, no beat", seconds=60 * seconds_scale),
        speech_song("speech-like, no beat", seconds=60 * seconds_scale),
    ]
