"""The search over genomes: archives, parent sampling, crossover, mutation, the CycleQD scheduler
(ask/tell), the other searches behind the same protocol (CMA-ES, NSGA-II, random, by
``evolution.search``) and the records of a child.

Re-exported, imported on first use: ``from cycleqd.search import Archive``.
"""
from cycleqd.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, archive="Archive Elite", scheduler="Scheduler OrderError",
                                                child="ChildSpec ChildResult ChildRecord SeedRecord",
                                                searches="make_scheduler", coefficients="CoefficientSearch",
                                                space="CoefficientSpace SpaceOptions", front="pareto_front")
