"""Tasks that score a model on one skill: the Task protocol, MBPP, AgentBench DB and OS, the mini tasks,
likelihood. Each is registered by name (``kind:`` in a config); see :mod:`cycleqd.registry`.

Its public nouns are re-exported here, imported on first use: ``from cycleqd.tasks import Task``.
"""
from cycleqd.registry import lazy_exports

_EXPORTS = {
    "Task": "cycleqd.tasks.protocol",
    "TaskResult": "cycleqd.tasks.protocol",
    "SampleResult": "cycleqd.tasks.protocol",
    "MBPPTask": "cycleqd.tasks.mbpp",
    "DBBenchTask": "cycleqd.tasks.dbbench",
    "OSInteractionTask": "cycleqd.tasks.os_interaction",
    "MiniCode": "cycleqd.tasks.mini_code",
    "MiniSQL": "cycleqd.tasks.mini_sql",
    "MiniShell": "cycleqd.tasks.mini_shell",
    "MiniRegex": "cycleqd.tasks.mini_regex",
    "Likelihood": "cycleqd.tasks.likelihood",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
