"""Tasks that score a model on one skill: the Task protocol, MBPP, AgentBench DB and OS, the mini tasks,
likelihood, synthetic (dry runs and benchmarks). Each is registered by name (``kind:`` in a config); see :mod:`cycleqd.registry`.

Re-exported, imported on first use: ``from cycleqd.tasks import Task``.
"""
from cycleqd.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, protocol="Task TaskResult SampleResult", mbpp="MBPPTask",
                                                dbbench="DBBenchTask", os_interaction="OSInteractionTask",
                                                mini_code="MiniCode", mini_sql="MiniSQL", mini_shell="MiniShell",
                                                mini_regex="MiniRegex", likelihood="Likelihood",
                                                synthetic="Synthetic")
