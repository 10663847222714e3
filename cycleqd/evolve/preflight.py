"""Everything checkable about an experiment, checked before anything is loaded or written.

:func:`preflight` runs :data:`CHECKS` in order on a resolved config; each check
raises :class:`~cycleqd.config.ConfigError` (exit 2, one line). ``evolve`` and
``resume`` call it before the run folder is created or touched and before Ray
starts; the checks read headers and small files only, so they take seconds.
Config-level checks (unknown keys and names, task options against each task's
``Options`` model, seeds >= 0) already ran when the config was parsed.
"""
from __future__ import annotations

import importlib
from typing import Callable

from cycleqd.config import Config, ConfigError
from cycleqd.registry import TASKS


def check_code_execution(cfg: Config) -> None:
    """Tasks whose class says ``executes_code`` need ``sandbox.allow_code_execution: true``."""
    if cfg.sandbox.allow_code_execution:
        return
    from cycleqd.tasks.foreign import declared_executes_code  # a package's class may not declare it: True

    runs_code = [t.name for t in cfg.tasks if declared_executes_code(TASKS.get(t.kind), t.kind)]
    if runs_code:
        raise ConfigError(
            f"task(s) {', '.join(runs_code)} run model-written code; set sandbox.allow_code_execution: true "
            "to allow it (it runs in the sandbox with time and memory limits)")


def check_model_files(cfg: Config) -> None:
    """Base and experts: config.json and every safetensors header readable, same architecture.

    Reads headers only (no tensor data). A mini world not built yet is skipped: it is built,
    and so trusted, by the run itself.

    Raises:
        ConfigError: naming the unreadable file, or the first mismatch between an expert and the base.
    """
    from cycleqd.model.experts import check_compatible, inspect_model

    m = cfg.models
    if m.mini is not None:
        from pathlib import Path

        if not all(Path(p).is_dir() for p in [m.base, *m.experts.values()]):
            return
    from cycleqd.model.adapters import expert_kind, read_experts

    if expert_kind(cfg) == "lora":  # adapters: their recorded base and module shapes against the base
        read_experts(m.base, {t: m.experts[t] for t in cfg.task_names}, m.revision, load=False)
        return
    base = inspect_model(m.base, m.revision)
    check_compatible(base, {t: inspect_model(m.experts[t], m.revision) for t in cfg.task_names})


def check_workers(cfg: Config) -> None:
    """The workers fit the machine or cluster: the hook of :mod:`cycleqd.model.plan` when it is installed.

    ``cycleqd.model.plan.check_workers(cfg)`` (raising ConfigError) estimates memory per worker from
    the engine's plan; without that module there is nothing to check here.
    """
    try:
        plan = importlib.import_module("cycleqd.model.plan")
    except ModuleNotFoundError as e:
        if e.name != "cycleqd.model.plan":
            raise
        return
    check = getattr(plan, "check_workers", None)
    if check is not None:
        check(cfg)


def check_lm_eval_tasks(cfg: Config) -> None:
    """``kind: lm_eval`` tasks: the lm-eval task names ("did you mean"), metrics and splits exist, and
    evolution and the final table score disjoint documents unless ``allow_overlap`` (see
    :mod:`cycleqd.tasks.lm_eval`). Loads the tasks' datasets (local files: seconds)."""
    specs = [t for t in cfg.tasks if t.kind == "lm_eval"]
    if not specs:
        return
    from cycleqd.tasks.lm_eval import LmEvalTask

    for t in specs:
        LmEvalTask(name=t.name, data=t.data, sandbox=cfg.sandbox, **t.options)


def check_fishfarm_samples(cfg: Config) -> None:
    """An OS task's ``data`` that names fishfarm's ``samples.pkl`` is read now, with the restricted
    unpickler: a global other than fishfarm's sample classes stops the run before it starts."""
    from cycleqd.tasks.fishfarm_os import read_samples, samples_file

    for t in cfg.tasks:
        path = samples_file(t.data) if t.kind == "os_interaction" and t.data else None
        if path is not None:
            read_samples(path)


#: The checks :func:`preflight` runs, cheapest first. Add a check here, not in the loop.
CHECKS: list[Callable[[Config], None]] = [check_code_execution, check_fishfarm_samples, check_workers,
                                          check_model_files, check_lm_eval_tasks]


def preflight(cfg: Config) -> None:
    """Run every check of :data:`CHECKS` on ``cfg``. Raises ConfigError (one line) at the first failure."""
    for check in CHECKS:
        check(cfg)
