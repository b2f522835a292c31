"""The song analysis as stored with a song and returned by the API: a versioned, JSON-serialisable pydantic model.

Times are seconds from the start of the song, rounded to the millisecond. ``grid`` is None when the beat evidence
is too weak to trust (speech, ambient pads, silence): ``no_grid_reason`` then says why, and scenes are sized by
length alone. Bump ``ANALYSIS_VERSION`` whenever the algorithm or the shape changes: a stored analysis of another
version is stale (:func:`load` returns None) and is computed again on first use.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ANALYSIS_VERSION: Final = 1

Seconds = float
Unit = Field(ge=0.0, le=1.0)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BeatEvidence(_Model):
    """Why the grid was trusted: ``pulse_clarity`` is the onset envelope's normalised autocorrelation at the beat
    period (the decision, needs >= 0.25); ``beat_contrast`` is the mean onset strength on beats over that between
    them (reported only: speech has strong onsets too)."""

    pulse_clarity: float
    beat_contrast: float


class Grid(_Model):
    tempo: float = Field(gt=0, description="BPM, from a least-squares fit of beat time over beat index")
    beats: list[Seconds] = Field(description="every tracked beat, ascending")
    downbeats: list[Seconds] = Field(description="the beats that start a bar (a subset of beats)")
    meter: Literal[3, 4] | None = Field(description="beats per bar when it can be told apart, else None")
    beats_per_bar: Literal[3, 4] = Field(description="the bar length used for the downbeats (4 when meter is None)")
    meter_confidence: float = Unit
    downbeat_confidence: float = Unit
    evidence: BeatEvidence

    @model_validator(mode="after")
    def _ordered(self) -> Grid:
        if any(b <= a for a, b in zip(self.beats, self.beats[1:], strict=False)):
            raise ValueError("beats must be strictly ascending")
        if not set(self.downbeats) <= set(self.beats):
            raise ValueError("every downbeat must be a beat")
        return self


class Section(_Model):
    start: Seconds = Field(ge=0)
    end: Seconds
    label: str = Field(description="the cluster as a letter: sections that sound alike share it (A, B, A, C, ...)")
    cluster: int = Field(ge=0)


class Curve(_Model):
    """Values sampled ``rate`` times a second from the start of the song, each in 0..1."""

    rate: int = Field(gt=0)
    values: list[float]


class SongAnalysis(_Model):
    version: Literal[1] = ANALYSIS_VERSION
    analyser: str = Field(description="what produced it, e.g. 'librosa 0.11.0'")
    duration: Seconds = Field(description="seconds analysed (the whole song unless truncated)")
    truncated: bool = Field(False, description="the song was longer than the analysis cap; the rest has no grid")
    grid: Grid | None
    no_grid_reason: str | None = None
    sections: list[Section] = Field(description="contiguous from 0 to duration; boundaries on downbeats with a grid")
    energy: Curve = Field(description="loudness (RMS, -60..0 dBFS as 0..1)")
    peaks: Curve = Field(description="waveform peaks (max |sample| per bucket, full scale 1)")

    @model_validator(mode="after")
    def _consistent(self) -> SongAnalysis:
        if (self.grid is None) == (self.no_grid_reason is None):
            raise ValueError("exactly one of grid and no_grid_reason is set")
        return self

    def bar_of(self, t: Seconds) -> int:
        """The bar containing ``t`` (0 = the first downbeat's bar, -1 before it); requires a grid."""
        assert self.grid is not None
        return sum(1 for d in self.grid.downbeats if d <= t + 1e-6) - 1


def load(data: Any) -> SongAnalysis | None:
    """A stored analysis, or None if it is of another version or malformed (so it is computed again)."""
    if not isinstance(data, dict) or data.get("version") != ANALYSIS_VERSION:
        return None
    try:
        return SongAnalysis.model_validate(data)
    except ValidationError:
        return None
