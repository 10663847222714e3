"""Task classes from other packages: named by import path (``kind: "my_package.skills:JsonSkill"``) or
registered under the entry-point group ``cycleqd.tasks``.

A class that derives from :class:`~cycleqd.tasks.protocol.Task` is used as it is. One that only
has the protocol's shape (``sample_ids()`` and ``evaluate(engine, ids)`` returning a
:class:`~cycleqd.tasks.protocol.TaskResult`) is wrapped by :class:`ForeignTask`, which gives it
the protocol's defaults: options from its constructor's keywords, ``answer`` that evaluates at
once, answers voted on by their text, and ``executes_code`` True unless the class says False
(a class that does not say is treated as running model code: preflight asks for
``sandbox.allow_code_execution``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.protocol import Engine, GenRequest
from cycleqd.registry import TASKS
from cycleqd.tasks.protocol import Task, TaskResult, text_signatures


def declared_executes_code(cls: Any, kind: str) -> bool:
    """The class's ``executes_code``; True (runs model code) when it does not declare it.

    Raises:
        ConfigError: it declares something other than True or False.
    """
    value = getattr(cls, "executes_code", None)
    if value is None:
        return True
    if not isinstance(value, bool):
        raise ConfigError(f"task kind {kind!r}: executes_code must be True or False, got {value!r}")
    return value


class ForeignTask(Task):
    """A task object from another package seen through the :class:`Task` protocol.

    Args:
        inner: the package's task object (has ``sample_ids`` and ``evaluate``).
        kind: its ``kind`` in the config (for messages).
    """

    def __init__(self, inner: Any, kind: str, sandbox: SandboxConfig | None = None):
        self.inner, self.kind = inner, kind
        self.name = str(getattr(inner, "name", kind))
        self.data = getattr(inner, "data", None)
        self.sandbox = sandbox or SandboxConfig()
        self.options = getattr(inner, "options", None)
        self.executes_code = declared_executes_code(type(inner), kind)  # type: ignore[misc]

    def sample_ids(self) -> list[str]:
        return [str(i) for i in self.inner.sample_ids()]

    def evaluate(self, engine: Engine, ids: Sequence[str] | None = None) -> TaskResult:
        """The package's ``evaluate``; its result must be a TaskResult (else TypeError naming the kind)."""
        if self.executes_code:
            from cycleqd.sandbox import require_code_execution

            require_code_execution(self.sandbox, self.name)
        return self._checked(self.inner.evaluate(engine, ids))

    def answer(self, engine: Engine, ids: Sequence[str] | None = None) -> Callable[[], TaskResult]:
        """The package's ``answer`` when it has one, else :meth:`evaluate` at once."""
        own = getattr(self.inner, "answer", None)
        if own is None:
            return super().answer(engine, ids)
        check = own(engine, ids)
        return lambda: self._checked(check())

    def answer_signatures(self, requests: Sequence[GenRequest], answers: Sequence[str]) -> list[str | None]:
        own = getattr(self.inner, "answer_signatures", None)
        return list(own(requests, answers)) if own is not None else text_signatures(answers)

    def _checked(self, result: Any) -> TaskResult:
        if not isinstance(result, TaskResult):
            raise TypeError(f"task {self.name} ({self.kind}): evaluate returned {type(result).__name__}, "
                            "not a cycleqd.tasks.protocol.TaskResult")
        return result


def make_task(kind: str, name: str, data: str | None = None, sandbox: SandboxConfig | None = None,
              **options: Any) -> Task:
    """The task ``kind`` (a registered name, an entry point or an import path) built with its options.

    A class that derives from :class:`Task` is returned as it is; any other is wrapped in a
    :class:`ForeignTask` and given only the common arguments (``name``, ``data``, ``sandbox``)
    its constructor takes.
    """
    cls = TASKS.get(kind)
    if isinstance(cls, type) and issubclass(cls, Task):
        return cls(name=name, data=data, sandbox=sandbox, **options)
    import inspect

    params = inspect.signature(cls).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    common = {k: v for k, v in (("name", name), ("data", data), ("sandbox", sandbox)) if open_ended or k in params}
    task = ForeignTask(cls(**common, **options), kind, sandbox)
    task.name = name  # the axis is the config's name, whatever the object calls itself
    return task
