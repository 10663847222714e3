"""Studies over runs: teams of elites, the mini table, trajectories for the next expert, scoring one model.

Re-exported, imported on first use: ``from cycleqd.studies import Team``.
"""
from cycleqd.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, team="Team make_team", table="make_table score_models",
                                                trajectories="harvest", score="score")
