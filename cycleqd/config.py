"""Experiment configuration: frozen pydantic models read from YAML.

Everything is validated here, before any model is loaded: unknown keys, unknown
operator / task / engine names, bad bin ranges, wrong counts and missing local
paths all raise :class:`ConfigError` with one clear line.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cycleqd.registry import CROSSOVERS, ENGINES, MUTATIONS, SAMPLERS, SEARCHES, TASKS, UnknownNameError, did_you_mean


class ConfigError(ValueError):
    """Bad input: a config, a path or a flag. The CLI turns it into exit code 2."""


# Bounds of every number that feeds an OS call, a timer or an allocation: a value past them
# is bad input here (one line, exit 2), never an OverflowError or a giant allocation later.
MAX_SECONDS = 3600.0  # a time limit (the sandbox's per job)
MIN_MEMORY_MB, MAX_MEMORY_MB = 64, 1 << 20  # a memory limit: 64 MB to 1 TB
MAX_SEED = 2**63 - 1
MAX_WORKERS = 1024
MAX_GENERATIONS = 10**7
MAX_BATCH = 4096
MAX_NEW_TOKENS = 1 << 20
MAX_RANK = 1 << 16
MAX_CELLS = 10**6
MAX_SCALE = 1e3  # operator magnitudes (rates, standard deviations, sampling factors)


class _Frozen(BaseModel):
    # allow_inf_nan=False: no config number is infinite or NaN (1e999 in YAML reads as inf)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Bins(_Frozen):
    """Bin range of one task's score axis; bins are (lo, hi], values outside are clamped."""

    lo: float = 0.0
    hi: float = 1.0
    count: int = Field(15, ge=1, le=1000)

    @model_validator(mode="after")
    def _range(self) -> "Bins":
        if not (0.0 <= self.lo < self.hi <= 1.0):
            raise ValueError(f"bin range needs 0 <= lo < hi <= 1, got lo={self.lo} hi={self.hi}")
        return self


class TaskConfig(_Frozen):
    """One task: a registered ``kind`` (mbpp, dbbench, ...), its data and its bins."""

    name: str
    kind: str
    data: str | None = None
    bins: Bins = Bins()
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", v):
            raise ValueError(f"task name {v!r} must be letters, digits, '_', '-' or '.'")
        return v


class MiniWorld(_Frozen):
    """Build the embedded mini world into ``dir`` if it is absent (see ``cycleqd mini build``)."""

    dir: str = ".cache/mini"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    size: Literal["default", "small", "tiny"] = "default"
    experts: Literal["dense", "lora"] = "dense"  # lora: also train PEFT LoRA experts (dir/lora_<skill>)


class ModelsConfig(_Frozen):
    """Base model and one expert per task (local HF folders or Hub ids)."""

    base: str
    experts: dict[str, str]
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = None
    mini: MiniWorld | None = None
    arch: str | None = None  # a config.json to plan with when the base is a Hub id not on disk


class FactorsConfig(_Frozen):
    """Where a worker keeps base, task vectors and SVD factors, and how the SVDs are computed.

    ``device: auto`` is the engine's device when the memory plan fits there, else host
    memory (pinned where CUDA exists), moved to the device tensor by tensor.
    ``svd_method: randomized`` needs ``evolution.mutation.rank``.
    """

    device: str = "auto"
    svd_method: Literal["exact", "randomized"] = "exact"


class CrossoverConfig(_Frozen):
    name: str = "linear"
    mu: float = Field(0.0, ge=-MAX_SCALE, le=MAX_SCALE)
    sigma: float = Field(0.01, ge=0.0, le=MAX_SCALE)


class MutationConfig(_Frozen):
    name: str = "svd"
    rate: float = Field(0.1, ge=0.0, le=MAX_SCALE)
    std: float = Field(3e-4, ge=0.0, le=MAX_SCALE)
    rank: int | None = Field(None, ge=1, le=MAX_RANK)


class SamplingConfig(_Frozen):
    """Parent sampling. ``mapping`` is how elite sampling maps each min-max-normalised factor:
    ``paper`` into [low, high]; ``official`` as the official CycleQD code, low + x * high, i.e.
    [low, low + high] = [0.5, 1.3] with the defaults."""

    name: str = "elite"
    low: float = Field(0.5, le=MAX_SCALE)
    high: float = Field(0.8, le=MAX_SCALE)
    mapping: Literal["paper", "official"] = "paper"

    @model_validator(mode="after")
    def _range(self) -> "SamplingConfig":
        if not (0.0 <= self.low <= self.high):
            raise ValueError(f"sampling needs 0 <= low <= high, got {self.low}, {self.high}")
        return self


class SearchConfig(_Frozen):
    """The search that asks for children: ``cycleqd`` (the archives' cycle, the default), or a
    search over merge coefficients (``cma_es``, ``nsga2``, ``random``; see
    :mod:`cycleqd.search.coefficients`). ``options`` are the search's own, validated against its
    ``Options`` model with the config. ``search: cma_es`` is short for ``search: {name: cma_es}``."""

    name: str = "cycleqd"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


class OperatorControlConfig(_Frozen):
    """CMA-ES operator control (the official ``qd.use_cma`` with its ``cma_es`` settings): one
    solver per quality task sets each child's crossover (mu, sigma) and mutation rate from its
    parents' bins (:mod:`cycleqd.search.operator_control`)."""

    name: Literal["cma"] = "cma"
    popsize: int = Field(8, ge=2, le=1024)
    sigma: float = Field(0.01, gt=0.0, le=MAX_SCALE)
    seed: int = Field(42, ge=0)


class EvolutionConfig(_Frozen):
    generations: int = Field(1200, ge=0, le=MAX_GENERATIONS)
    workers: int = Field(1, ge=1, le=MAX_WORKERS)
    flip_interval: int = Field(1, ge=1, le=MAX_GENERATIONS)
    fixed_quality_task: str | None = None
    crossover: CrossoverConfig = CrossoverConfig()
    mutation: MutationConfig = MutationConfig()
    sampling: SamplingConfig = SamplingConfig()
    search: SearchConfig = SearchConfig()
    final_merge: bool = True
    # Store the passing conversations of every child that enters an archive (and of the seed
    # experts) in RUN/episodes/<genome>.jsonl, for `cycleqd trajectories`.
    record_episodes: bool = False
    worker_cpus: float = Field(0.0, ge=0.0, le=MAX_WORKERS)
    worker_gpus: float = Field(0.0, ge=0.0, le=MAX_WORKERS)
    # Warn (once a run) when a child's answers on a task stop at max_new_tokens more often than this.
    truncation_warning: float = Field(0.1, ge=0.0, le=1.0)
    operator_control: OperatorControlConfig | None = None  # None: the configured mu, sigma and rate
    # LoRA experts only: children a worker evaluates at once, as adapters in one engine
    # (their generation calls share batches; see cycleqd.engine.gather).
    children_per_worker: int = Field(1, ge=1, le=64)
    # When a finished child's genome and log line are fsynced: "batch" (a background thread, in
    # groups; a killed driver loses nothing, a machine crash the last moments) or "child" (before
    # the next child is asked). See cycleqd.runs.durable.
    fsync: Literal["batch", "child"] = "batch"


class EngineConfig(_Frozen):
    name: str = "transformers"
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    options: dict[str, Any] = Field(default_factory=dict)


class SandboxConfig(_Frozen):
    """Running model-written code is opt-in: ``allow_code_execution`` must be true.

    ``timeout`` (seconds per job) is in (0, 3600]; ``memory_mb`` (per job) in [64, 1048576].
    ``backend``: ``auto`` (bwrap), ``bwrap`` or ``docker``; ``subprocess`` would run model code
    on the host uncontained and is refused here (see :mod:`cycleqd.sandbox.backends`).
    """

    allow_code_execution: bool = False
    backend: Literal["auto", "bwrap", "subprocess", "docker"] = "auto"
    timeout: float = Field(10.0, gt=0, le=MAX_SECONDS)
    memory_mb: int = Field(1024, ge=MIN_MEMORY_MB, le=MAX_MEMORY_MB)

    @model_validator(mode="after")
    def _contained(self) -> "SandboxConfig":
        if self.backend == "subprocess":
            raise ValueError("backend 'subprocess' runs model code on the host without containment; "
                             "use 'bwrap' (the default) or 'docker'")
        return self


class ArchiveConfig(_Frozen):
    """The kind of the K archives: ``grid`` (the default: bins of the other tasks) or ``cvt``.

    A CVT archive has ``cells`` centroids in the other tasks' normalised score space
    [0, 1]^(K-1), by k-means seeded with ``seed`` (so a run replays exactly), or the
    given ``centroids``. It keeps the cell count fixed as K grows, where a grid's is the
    product of the other tasks' bin counts.
    """

    kind: Literal["grid", "cvt"] = "grid"
    cells: int | None = Field(None, ge=1, le=MAX_CELLS)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    centroids: list[list[float]] | None = None

    @model_validator(mode="after")
    def _cvt(self) -> "ArchiveConfig":
        if self.kind == "grid" and (self.cells is not None or self.centroids is not None):
            raise ValueError("cells and centroids are settings of a cvt archive (kind: cvt)")
        if self.kind == "cvt":
            if (self.cells is None) == (self.centroids is None):
                raise ValueError("a cvt archive needs either cells (a number) or centroids (a list)")
            if self.centroids is not None:
                dims = {len(c) for c in self.centroids}
                if len(dims) != 1 or not self.centroids:
                    raise ValueError("archive.centroids must be a non-empty list of points of one dimension")
                if any(not 0.0 <= x <= 1.0 for c in self.centroids for x in c):
                    raise ValueError("archive.centroids lie in the normalised score space [0, 1]")
        return self


class Config(_Frozen):
    """A whole experiment."""

    name: str = "experiment"
    seed: int = Field(0, ge=0, le=MAX_SEED)  # numpy's SeedSequence takes non-negative seeds only
    models: ModelsConfig
    tasks: list[TaskConfig]
    evolution: EvolutionConfig = EvolutionConfig()
    engine: EngineConfig = EngineConfig()
    factors: FactorsConfig = FactorsConfig()
    sandbox: SandboxConfig = SandboxConfig()
    archive: ArchiveConfig = ArchiveConfig()
    prepare_cache: str = ".cache/prepare"

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        names = [t.name for t in self.tasks]
        if len(names) < 2:
            raise ValueError(f"need at least 2 tasks, got {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"task names repeat: {names}")
        missing = [n for n in names if n not in self.models.experts]
        if missing:
            raise ValueError(f"no expert for task(s) {missing}; models.experts has {sorted(self.models.experts)}")
        c = self.archive.centroids
        if c is not None and len(c[0]) != len(names) - 1:
            raise ValueError(f"archive.centroids are points in {len(c[0])} dimensions; {len(names)} tasks need {len(names) - 1}")
        if self.factors.svd_method == "randomized" and self.evolution.mutation.rank is None:
            raise ValueError("factors.svd_method: randomized needs evolution.mutation.rank")
        q = self.evolution.fixed_quality_task
        if q is not None and q not in names:
            raise ValueError(f"evolution.fixed_quality_task {q!r} is not a task ({names})")
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def expert_paths(self) -> list[str]:
        """Expert model paths in task order."""
        return [self.models.experts[t] for t in self.task_names]


def looks_like_hub_id(s: str) -> bool:
    """``owner/name`` as the Hugging Face Hub spells a repository id (the one pattern every check uses)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not s.startswith((".", "/"))


def _check_model_path(p: str, what: str, base_dir: Path, mini: MiniWorld | None) -> None:
    if mini is not None:
        return  # built on demand
    path = Path(p) if os.path.isabs(p) else base_dir / p
    if Path(p).exists() or path.exists():
        return
    if looks_like_hub_id(p) and not Path(p).parent.exists():
        return
    raise ConfigError(f"{what}: path {p!r} does not exist")


def _check_names(cfg: Config) -> None:
    try:
        CROSSOVERS.check(cfg.evolution.crossover.name)
        MUTATIONS.check(cfg.evolution.mutation.name)
        SAMPLERS.check(cfg.evolution.sampling.name)
        ENGINES.check(cfg.engine.name)
        for t in cfg.tasks:
            TASKS.check(t.kind)
        SEARCHES.check(cfg.evolution.search.name)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
    check_options = getattr(SEARCHES.get(cfg.evolution.search.name), "check_options", None)
    if check_options is not None:
        check_options(cfg)  # the search's options, before any model is loaded
    elif cfg.evolution.search.options:
        raise ConfigError(f"evolution.search: {cfg.evolution.search.name} takes no options")
    for t in cfg.tasks:
        check_task_options(t)
    if cfg.evolution.operator_control is not None and cfg.evolution.search.name != "cycleqd":
        raise ConfigError(f"evolution.operator_control steers CycleQD's crossover and mutation; "
                          f"search {cfg.evolution.search.name!r} has none (drop one of them)")
    if cfg.evolution.operator_control is not None and cfg.archive.kind != "grid":
        raise ConfigError("evolution.operator_control reads the parents' bins: it needs archive.kind: grid")


def check_task_options(task: TaskConfig) -> BaseModel:
    """Validate ``task.options`` against its task class's ``Options`` model (imports the task module).

    Every task class declares ``Options``: a frozen pydantic model (extra="forbid") of the
    keyword options its constructor takes, so a typo is bad input here, not a TypeError
    inside a worker. Returns the validated options.

    Raises:
        ConfigError: an unknown option (with "did you mean ...") or a bad value, in one line.
    """
    return validate_options(task_options_model(TASKS.get(task.kind), task.kind), f"{task.name} ({task.kind})",
                            task.options)


def task_options_model(cls: Any, kind: str) -> type[BaseModel]:
    """The options model of a task class: its ``Options``, or, for a class from a package that
    declares none, one read from its constructor's keyword parameters (any option when it
    takes ``**options``).

    Raises:
        ConfigError: ``kind`` names no class with ``sample_ids`` and ``evaluate`` (see docs/tasks.md).
    """
    import inspect

    if not isinstance(cls, type) or not callable(getattr(cls, "evaluate", None)) \
            or not callable(getattr(cls, "sample_ids", None)):
        raise ConfigError(f"task kind {kind!r} is not a Task class (it needs sample_ids() and "
                          "evaluate(engine, ids); see docs/tasks.md)")
    declared = getattr(cls, "Options", None)
    if isinstance(declared, type) and issubclass(declared, BaseModel):
        return declared
    if declared is not None:
        raise ConfigError(f"task kind {kind!r}: Options must be a pydantic BaseModel class")
    from pydantic import create_model

    fields: dict[str, Any] = {}
    extra = "forbid"
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind is p.VAR_KEYWORD:
            extra = "allow"
        elif p.name not in ("name", "data", "sandbox") and p.kind is not p.VAR_POSITIONAL:
            ann = Any if p.annotation is p.empty or isinstance(p.annotation, str) else p.annotation
            fields[p.name] = (ann, ... if p.default is p.empty else p.default)
    return create_model(f"{cls.__name__}Options", __config__=ConfigDict(frozen=True, extra=extra), **fields)


def validate_options(model: type[BaseModel], task: str, options: dict[str, Any]) -> BaseModel:
    """``options`` as the task's typed ``model``; the one check of a task's options, at load and in a worker.

    Raises:
        ConfigError: an unknown option (with "did you mean ...") or a bad value, in one line.
    """
    renamed = getattr(model, "renamed", {})  # old option names a run folder may still hold
    options = {renamed.get(k, k): v for k, v in options.items()}
    fields = list(model.model_fields)
    for key in options:
        if key not in fields and model.model_config.get("extra") != "allow":  # allow: a constructor's **options
            raise ConfigError(f"task {task}: unknown option {key!r}{did_you_mean(key, fields)} "
                              f"(options: {', '.join(fields) or 'none'})")
    try:
        return model.model_validate(options)
    except ValidationError as e:
        raise ConfigError(f"task {task}: options.{one_line_error(e, model)}") from None


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the model that holds the last key of ``loc`` (for "did you mean")."""
    for key in loc[:-1]:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(str(key))
        if field is None:
            return []
        ann = field.annotation
        for arg in (getattr(ann, "__args__", None) or (ann,)):  # Optional[X], list[X]
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
                break
        else:
            return []
    return list(model.model_fields)


def one_line_error(e: ValidationError, model: type[BaseModel] | None = None) -> str:
    """A pydantic error as one line: up to three ``loc: message`` parts ("did you mean" for unknown keys)."""
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and model is not None and err["loc"]:
            msg = f"unknown setting{did_you_mean(err['loc'][-1], _fields_at(model, err['loc']))}"
        parts.append(f"{loc}: {msg}")
    more = f" (+{e.error_count() - 3} more)" if e.error_count() > 3 else ""
    return "; ".join(parts) + more


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate a mapping into a Config. Raises ConfigError with one line."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        raise ConfigError(f"{source}: expected a mapping of settings, got {kind}")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {one_line_error(e, Config)}") from None
    _check_names(cfg)
    return cfg


def load_config(path: str | os.PathLike, *, check_paths: bool = True) -> Config:
    """Read and validate an experiment YAML. Raises ConfigError (bad input) with one line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    cfg = parse_config(data, str(path))
    if check_paths:
        for t in cfg.tasks:
            if t.data is not None and not t.data.startswith(("hf://", "mini://")):
                if not Path(t.data).exists() and not looks_like_hub_id(t.data):
                    raise ConfigError(f"task {t.name}: data path {t.data!r} does not exist")
        _check_model_path(cfg.models.base, "models.base", Path.cwd(), cfg.models.mini)
        for task, e in cfg.models.experts.items():
            _check_model_path(e, f"models.experts.{task}", Path.cwd(), cfg.models.mini)
    return cfg


def edit_config(cfg: Config, edit: Callable[[dict], None], source: str = "config") -> Config:
    """``cfg`` changed by ``edit`` (a function that changes the config's dict in place), validated again.

    The one way a config is changed after it was loaded (CLI overrides, splits, table
    variants, growth), so every change goes through the same checks as a YAML file.

    Raises:
        ConfigError: the edited config is not valid, in one line.
    """
    data = cfg.model_dump()
    edit(data)
    return parse_config(data, source)


def split_config(cfg: Config, split: str, n: int | None = None, seed: int | None = None) -> Config:
    """``cfg`` with every task reading ``split`` (and ``n`` items, drawn with ``seed``, if given)."""

    def edit(data: dict) -> None:
        for t in data["tasks"]:
            t["options"] = {**t["options"], "split": split, **({"n": n} if n else {}),
                            **({"seed": seed} if seed is not None else {})}

    return edit_config(cfg, edit)


def with_overrides(
    cfg: Config,
    *,
    tasks: list[str] | None = None,
    generations: int | None = None,
    workers: int | None = None,
    seed: int | None = None,
) -> Config:
    """Apply CLI overrides and re-validate. Raises ConfigError."""
    return edit_config(cfg, lambda data: _override(data, cfg, tasks, generations, workers, seed))


def _override(data: dict, cfg: Config, tasks: list[str] | None, generations: int | None, workers: int | None,
              seed: int | None) -> None:
    if tasks is not None:
        known = cfg.task_names
        bad = [t for t in tasks if t not in known]
        if bad:
            hint = did_you_mean(bad[0], known)
            raise ConfigError(f"--tasks: unknown task {bad[0]!r}{hint} (config has {', '.join(known)})")
        if len(set(tasks)) < 2:
            raise ConfigError(f"--tasks: need at least 2 distinct tasks, got {tasks}")
        data["tasks"] = [t for t in data["tasks"] if t["name"] in tasks]
        data["models"]["experts"] = {k: v for k, v in data["models"]["experts"].items() if k in tasks}
    if generations is not None:
        if generations < 0:
            raise ConfigError(f"--generations must be >= 0, got {generations}")
        data["evolution"]["generations"] = generations
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        data["evolution"]["workers"] = workers
    if seed is not None:
        if seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {seed}")
        data["seed"] = seed


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written into every run folder)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def resolve_paths(cfg: Config, root: str | os.PathLike | None = None) -> Config:
    """Make every local path absolute (Hub ids stay as they are), so a run folder is self-contained."""
    root = Path(root or Path.cwd())

    def fix(p: str | None, local: bool = False) -> str | None:
        if p is None or p.startswith(("hf://", "mini://")) or os.path.isabs(p):
            return p
        q = root / p
        if local or q.exists() or not looks_like_hub_id(p):
            return str(q.resolve())
        return p

    mini = cfg.models.mini is not None

    def edit(data: dict) -> None:
        data["models"]["base"] = fix(cfg.models.base, mini)
        data["models"]["experts"] = {k: fix(v, mini) for k, v in cfg.models.experts.items()}
        if mini:
            data["models"]["mini"]["dir"] = fix(cfg.models.mini.dir, True)
        data["tasks"] = [{**t, "data": fix(t["data"])} for t in data["tasks"]]
        for t in data["tasks"]:  # a task's own folder option (lm_eval's include_path)
            if isinstance(t["options"].get("include_path"), str):
                t["options"] = {**t["options"], "include_path": fix(t["options"]["include_path"], True)}
        data["prepare_cache"] = fix(cfg.prepare_cache, True)

    return edit_config(cfg, edit)
