"""The task protocol under the name task packages written against older cycleqd import.

``from cycleqd.tasks.base import TaskResult`` is :mod:`cycleqd.tasks.protocol`'s ``TaskResult``;
new code imports from :mod:`cycleqd.tasks.protocol` (or :mod:`cycleqd.tasks`).
"""
from cycleqd.tasks.protocol import SampleResult, Task, TaskResult, Votable, text_signatures

__all__ = ["SampleResult", "Task", "TaskResult", "Votable", "text_signatures"]
