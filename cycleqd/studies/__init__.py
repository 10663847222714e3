"""Studies over runs: teams of elites, the mini table, trajectories for the next expert, scoring one model.

Its public nouns are re-exported here, imported on first use: ``from cycleqd.studies import Team``.
"""
from cycleqd.registry import lazy_exports

_EXPORTS = {
    "Team": "cycleqd.studies.team",
    "make_team": "cycleqd.studies.team",
    "make_table": "cycleqd.studies.table",
    "score_models": "cycleqd.studies.table",
    "harvest": "cycleqd.studies.trajectories",
    "score": "cycleqd.studies.score",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
