"""The run folder: resolved config, genomes, children.jsonl, archive snapshots.

``children.jsonl`` is the write-ahead log of a run: a child's genome file is
written first, then its line (flushed and fsynced), then the archive snapshot.
The archives are a pure function of the seed experts and the log (offer in
order), so a driver killed at any moment resumes without losing an elite or a
finished child; a half-written last line is dropped.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from cycleqd.config import Config, ConfigError, dump_config, load_config


_UMASK = os.umask(0)
os.umask(_UMASK)


class RunNotFound(ConfigError):
    """The path is not a cycleqd run folder (bad input)."""


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_jsonl(path: Path) -> Iterator[dict]:
    if not path.exists():
        return
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return  # torn last line of a killed writer
            line = raw.strip()
            if line:
                yield json.loads(line)


class RunStore:
    """A run folder on disk (see DESIGN.md section 7).

    Args:
        path: an existing run folder. Raises RunNotFound if it holds no run.
    """

    CONFIG = "config.yaml"
    ARCHIVES = "archives.json"
    CHILDREN = "children.jsonl"
    STATS = "stats.jsonl"
    SEEDS = "seeds.json"
    FINAL = "final_merge.json"
    MODELS = "models.json"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / self.CONFIG).is_file():
            raise RunNotFound(f"{str(path)!r} is not a cycleqd run folder (no {self.CONFIG})")

    @classmethod
    def create(cls, path: str | os.PathLike, cfg: Config) -> "RunStore":
        """Start a new run folder holding the resolved ``cfg``. Raises ConfigError if one is there."""
        p = Path(path)
        if (p / cls.CONFIG).exists():
            raise ConfigError(f"{str(path)!r} already holds a run; continue it with `cycleqd resume {path}`")
        if p.exists() and any(p.iterdir()):
            raise ConfigError(f"run folder {str(path)!r} exists and is not empty")
        (p / "genomes").mkdir(parents=True, exist_ok=True)
        (p / "plots").mkdir(exist_ok=True)
        write_atomic(p / cls.CONFIG, dump_config(cfg))
        return cls(p)

    # -- reading ---------------------------------------------------------------
    def config(self) -> Config:
        return load_config(self.path / self.CONFIG, check_paths=False)

    def archives(self) -> dict[str, Any]:
        """The last archive snapshot (the ``show --json`` object)."""
        f = self.path / self.ARCHIVES
        if not f.exists():
            cfg = self.config()
            return {"generation": 0, "tasks": cfg.task_names, "bins": {}, "archives": {
                t: {"coverage": 0.0, "qd_score": 0.0, "best": 0.0, "elites": []} for t in cfg.task_names}}
        return json.loads(f.read_text())

    def children(self) -> list[dict]:
        return list(_read_jsonl(self.path / self.CHILDREN))

    def stats(self) -> list[dict]:
        return list(_read_jsonl(self.path / self.STATS))

    def seeds(self) -> dict[str, dict]:
        """{task: {"genome": id, "scores": {...}}} for the seed experts (generation 0)."""
        f = self.path / self.SEEDS
        return json.loads(f.read_text()) if f.exists() else {}

    def final_merge(self) -> dict | None:
        f = self.path / self.FINAL
        return json.loads(f.read_text()) if f.exists() else None

    def models(self) -> dict[str, str] | None:
        """Fingerprints of the base and experts the run was started on (None before the first drive)."""
        f = self.path / self.MODELS
        return json.loads(f.read_text()) if f.exists() else None

    def genome_path(self, genome_id: str) -> Path:
        return self.path / "genomes" / f"{genome_id}.safetensors"

    def load_genome(self, genome_id: str):
        from cycleqd.genome import Genome

        p = self.genome_path(genome_id)
        if not p.exists():
            raise RunNotFound(f"genome {genome_id!r} not found in {self.path}")
        return Genome.load(p)

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    # -- writing ---------------------------------------------------------------
    def save_genome(self, genome_id: str, data: bytes) -> None:
        write_atomic(self.genome_path(genome_id), data)

    def save_seeds(self, seeds: dict[str, dict]) -> None:
        write_atomic(self.path / self.SEEDS, json.dumps(seeds, indent=1))

    def save_models(self, fingerprints: dict[str, str]) -> None:
        write_atomic(self.path / self.MODELS, json.dumps(fingerprints, indent=1))

    def _append(self, name: str, record: dict) -> None:
        f = self.path / name
        # drop a torn tail first so the new line starts on a line boundary
        if f.exists() and f.stat().st_size:
            with open(f, "rb+") as h:
                h.seek(-1, os.SEEK_END)
                if h.read(1) != b"\n":
                    data = f.read_bytes()
                    h.truncate(data.rfind(b"\n") + 1)
        with open(f, "a") as h:
            h.write(json.dumps(record) + "\n")
            h.flush()
            os.fsync(h.fileno())

    def append_child(self, record: dict) -> None:
        self._append(self.CHILDREN, record)

    def append_stats(self, record: dict) -> None:
        self._append(self.STATS, record)

    def write_archives(self, snapshot: dict) -> None:
        write_atomic(self.path / self.ARCHIVES, json.dumps(snapshot))

    def write_final_merge(self, record: dict) -> None:
        write_atomic(self.path / self.FINAL, json.dumps(record, indent=1))


def model_fingerprints(cfg: Config) -> dict[str, str]:
    """{"base": ..., "expert_<task>": ...}: fingerprints of the weights a run's genomes are written against."""
    from cycleqd.experts import model_fingerprint

    m = cfg.models
    now = {"base": model_fingerprint(m.base, m.revision)}
    now.update({f"expert_{t}": model_fingerprint(path, m.revision) for t, path in m.experts.items()})
    return now


def check_models(store: RunStore, cfg: Config) -> None:
    """Record the run's model fingerprints on its first drive; refuse to go on if they changed.

    A run's genomes are coefficients over the task vectors of these exact models, so
    continuing it on other weights (a rebuilt mini world, a re-uploaded expert) would mix
    two experiments.

    Raises:
        ConfigError: the models differ from the ones the run started on.
    """
    now = model_fingerprints(cfg)
    before = store.models()
    if before is None:
        store.save_models(now)
        return
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise ConfigError(
            f"{store.path}: the weights of {', '.join(changed)} changed since this run started "
            f"(see {RunStore.MODELS}); start a new run instead of resuming this one"
        )


def default_run_dir(cfg: Config, root: str | os.PathLike = "archives") -> Path:
    """archives/<experiment>-<yyyymmdd-hhmmss>[-n] (never an existing folder)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    p = Path(root) / f"{cfg.name}-{stamp}"
    n = 1
    while p.exists():
        n += 1
        p = Path(root) / f"{cfg.name}-{stamp}-{n}"
    return p
