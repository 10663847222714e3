"""Score one model, or one file of recorded answers, on one task (``cycleqd score``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cycleqd.config import ConfigError, EngineConfig, SandboxConfig
from cycleqd.registry import ENGINES, TASKS, UnknownNameError
from cycleqd.sandbox import CodeExecutionNotAllowed
from cycleqd.tasks.protocol import TaskResult


def score(task_kind: str, data: str, *, model: str | None = None, answers: str | None = None,
          ids: list[str] | None = None, options: dict[str, Any] | None = None,
          engine_cfg: EngineConfig | None = None, sandbox: SandboxConfig | None = None,
          select: str | None = None, protocol: str | None = None) -> TaskResult:
    """Evaluate ``model`` (a local folder or Hub id) or replay ``answers`` (JSONL) on a task.

    Replaying answers is an explicit request to score them, so it runs their code in the
    sandbox (``allow_code_execution=True``); scoring a model does the same, as the user
    asked for it on the command line. ``options`` are the task's options (as in a config);
    ``select`` and ``protocol``, when given, are two of them (``--select`` / ``--protocol``).

    Raises:
        ConfigError: unknown task, missing data / answers / model, bad JSONL, bad options,
            or not exactly one of ``model`` and ``answers``.
    """
    if (model is None) == (answers is None):
        raise ConfigError("give exactly one of --model and --answers")
    try:
        TASKS.get(task_kind)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
    if not data:
        raise ConfigError("--data is required")
    if not data.startswith("hf://") and not Path(data).exists():
        raise ConfigError(f"data file {data!r} not found")
    box = sandbox or SandboxConfig(allow_code_execution=True)
    opts = dict(options or {})
    opts.update({k: v for k, v in (("select", select), ("protocol", protocol)) if v is not None})
    from cycleqd.tasks.foreign import make_task  # a package's class is wrapped in the Task protocol

    try:
        task = make_task(task_kind, name=task_kind, data=data, sandbox=box, **opts)
    except TypeError as e:  # an option the task does not take
        raise ConfigError(f"task {task_kind}: {e}") from None
    if answers is not None:
        engine = ENGINES.get("replay")(answers)
    else:
        from cycleqd.engine.hf import HFEngine  # heavy: only when a model is scored

        m = str(model)
        hub_like = m.count("/") == 1 and not m.startswith((".", "/", "~"))
        if not Path(m).exists() and not hub_like:
            raise ConfigError(f"model {m!r} is neither a folder nor a Hub id")
        try:
            engine = HFEngine.from_path(m, engine_cfg or EngineConfig())
        except OSError as e:  # not a model folder, or a Hub id that cannot be fetched
            raise ConfigError(f"could not load model {m!r}: {str(e).splitlines()[0]}") from None
    try:
        return task.evaluate(engine, ids=[str(i) for i in ids] if ids is not None else None)
    except CodeExecutionNotAllowed as e:
        raise ConfigError(str(e)) from None


def summary(result: TaskResult) -> dict[str, Any]:
    """The ``--json`` object: {"task", "quality", "n", "failed_ids"}."""
    return {"task": result.task, "quality": result.quality, "n": result.n, "failed_ids": result.failed_ids}
