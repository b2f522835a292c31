"""Song analysis: tempo, beats, downbeats, meter, sections, energy and waveform peaks, and the scene grid built on them.

The server side (this package's ``model``, ``pool`` and ``plan`` modules) imports no numerical library: librosa
and numpy run in worker processes (``worker``, ``core``). ``analyse_song`` analyses one song off the event loop
with a time limit; ``plan_scenes`` cuts a song into scene windows on its bars; ``snap`` moves a time to the grid.
"""

from mvserver.analysis.model import ANALYSIS_VERSION, Grid, Section, SongAnalysis, load
from mvserver.analysis.plan import Placement, PlanError, SceneWindow, locate, plan_scenes, snap
from mvserver.analysis.pool import AnalysisError, AnalysisPool, AnalysisTimeout, analyse_song, numba_cache_dir

__all__ = [
    "ANALYSIS_VERSION",
    "AnalysisError",
    "AnalysisPool",
    "AnalysisTimeout",
    "Grid",
    "Placement",
    "PlanError",
    "SceneWindow",
    "Section",
    "SongAnalysis",
    "analyse_song",
    "load",
    "locate",
    "numba_cache_dir",
    "plan_scenes",
    "snap",
]
