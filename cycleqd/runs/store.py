"""The run folder: resolved config, genomes, children.jsonl, archive snapshots.

``children.jsonl`` is the write-ahead log of a run: a child's genome file is
written first, then its line (flushed and fsynced), then the archive snapshot.
The archives are a pure function of the seed experts and the log (offer in
order), so a driver killed at any moment resumes without losing an elite or a
finished child; a half-written last line is dropped. Anything else that cannot
be read (a bad line in the middle of the log, an unreadable genome or JSON
file) raises :class:`RunDamaged` naming the file (and line); ``cycleqd check
RUN --repair`` moves such files aside. :class:`cycleqd.runs.folder.RunFolder` is
the read model built on this store.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from pydantic import ValidationError

from cycleqd.atomic import write_atomic
from cycleqd.bounded import MAX_LINE_BYTES, TooLarge, iter_lines, loads_bounded, read_json_file
from cycleqd.config import Config, ConfigError, dump_config, load_config
from cycleqd.runs import layout
from cycleqd.runs.lock import LOCK_NAME, RunLock
from cycleqd.search.archive import Archive
from cycleqd.search.child import ChildRecord, SeedRecord


class RunNotFound(ConfigError):
    """The path is not a cycleqd run folder (bad input)."""


class RunDamaged(ConfigError):
    """A file of the run folder cannot be trusted; the message names it (and the line).

    Bad input (exit 2): nothing is written, and ``cycleqd check RUN --repair`` moves
    what cannot be trusted into RUN/quarantine/ so the run resumes.
    """

    def __init__(self, path: Path, what: str, line: int | None = None):
        self.file, self.line = Path(path), line
        where = f"{path}:{line}" if line is not None else str(path)
        run = self.file.parent if self.file.parent.name != layout.GENOMES else self.file.parent.parent
        super().__init__(f"{where}: {what}; `cycleqd check {run} --repair` moves it into quarantine/")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per line of a JSONL log; a torn last line (no newline) is dropped.

    Lines are read bounded (:mod:`cycleqd.bounded`): a line over
    ``MAX_LINE_BYTES`` or nested deeper than ``MAX_DEPTH`` is never parsed.

    Raises:
        RunDamaged: a complete line that is not a JSON object, or one over the bounds, naming the file and line.
    """
    if not path.exists():
        return
    for n, raw, complete in iter_lines(path):
        if raw is None:
            raise RunDamaged(path, f"a line over {MAX_LINE_BYTES} bytes", n)
        if not complete:
            return  # torn last line of a killed writer
        line = raw.strip()
        if not line:
            continue
        obj = _json_line(path, line, n)
        if not isinstance(obj, dict):
            raise RunDamaged(path, f"not a JSON object (got {type(obj).__name__})", n)
        yield n, obj


def _json_line(path: Path, line: bytes, n: int | None) -> Any:
    try:
        return loads_bounded(line, max_bytes=MAX_LINE_BYTES)
    except TooLarge as e:
        raise RunDamaged(path, f"JSON {e}", n) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDamaged(path, f"not a JSON line ({_short(e)})", n) from None


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _read_json(path: Path) -> Any:
    try:
        return read_json_file(path)
    except OSError as e:
        raise RunDamaged(path, f"unreadable ({e.strerror or e})") from None
    except TooLarge as e:
        raise RunDamaged(path, f"JSON {e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDamaged(path, f"not valid JSON ({_short(e)})") from None


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, from its header alone (None if it looks whole).

    The header is read bounded (:func:`cycleqd.model.genome.parse_header`): at most
    ``MAX_HEADER_BYTES``, shallow, with contiguous tensor data that ends exactly at the end
    of the file, so a truncated or an oversized file is caught without reading its tensors.
    """
    from cycleqd.model.genome import genome_problem

    return genome_problem(path, values=False)


class RunStore:
    """A run folder on disk (see DESIGN.md section 7).

    Args:
        path: an existing run folder. Raises RunNotFound if it holds no run.
    """

    CONFIG = layout.CONFIG
    ARCHIVES = layout.ARCHIVES
    CHILDREN = layout.CHILDREN
    STATS = layout.STATS
    SEEDS = layout.SEEDS
    FINAL = layout.FINAL
    MODELS = layout.MODELS
    EPISODES = layout.EPISODES  # episodes/<genome>.jsonl: an elite's passing conversations (evolution.record_episodes)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / self.CONFIG).is_file():
            raise RunNotFound(f"{str(path)!r} is not a cycleqd run folder (no {self.CONFIG})")
        # an experiment YAML copied into a folder is not a run: a run folder is made with its genomes/
        if not (self.path / layout.GENOMES).is_dir() and not (self.path / self.CHILDREN).is_file():
            raise RunNotFound(f"{str(path)!r} is not a cycleqd run folder (a {self.CONFIG} but no {layout.GENOMES}/)")
        self._shape = None
        self.syncer = None  # a Syncer while the loop runs with evolution.fsync: batch (see start_syncer)
        self._tails: dict[str, int] = {}  # log -> its size after this store's last append (a clean tail)

    @classmethod
    def create(cls, path: str | os.PathLike, cfg: Config, lock: RunLock | None = None) -> "RunStore":
        """Start a new run folder holding the resolved ``cfg``.

        With ``lock`` (a :class:`~cycleqd.runs.lock.RunLock` of ``path``), it is taken before the
        folder is checked and written, so two drivers never start the same folder.

        Raises:
            ConfigError: the folder holds a run or other files; RunLocked: another driver holds it.
        """
        p = Path(path)
        made = not p.exists()
        p.mkdir(parents=True, exist_ok=True)
        try:
            if lock is not None:
                lock.acquire()
            if (p / cls.CONFIG).exists():
                raise ConfigError(f"{str(path)!r} already holds a run; continue it with `cycleqd resume {path}`")
            if any(q.name != LOCK_NAME for q in p.iterdir()):
                raise ConfigError(f"run folder {str(path)!r} exists and is not empty")
        except BaseException:
            if lock is not None and lock.held:
                lock.release()
                if made:
                    (p / LOCK_NAME).unlink(missing_ok=True)
            if made and not any(p.iterdir()):
                p.rmdir()  # nothing written: not even the folder stays
            raise
        (p / layout.GENOMES).mkdir(exist_ok=True)
        (p / layout.PLOTS).mkdir(exist_ok=True)
        write_atomic(p / cls.CONFIG, dump_config(cfg))
        return cls(p)

    # -- reading ---------------------------------------------------------------
    def config(self) -> Config:
        return load_config(self.path / self.CONFIG, check_paths=False)

    def archives(self) -> dict[str, Any] | None:
        """The archive snapshot file as written (None if missing or unreadable).

        It is a cache of a pure function of the seeds and the log;
        :meth:`cycleqd.runs.folder.RunFolder.snapshot` rebuilds it when it is missing or stale.
        """
        f = self.path / self.ARCHIVES
        try:
            data = read_json_file(f)
        except (OSError, ValueError, UnicodeDecodeError):  # TooLarge is a ValueError
            return None
        return data if isinstance(data, dict) and "archives" in data and "generation" in data else None

    def children(self) -> list[ChildRecord]:
        """Every finished child, in log order (record ``generation`` = its line's rank).

        Raises:
            RunDamaged: a line that is not a valid record, naming the file and line.
        """
        f = self.path / self.CHILDREN
        out = []
        for n, obj in read_jsonl(f):
            try:
                out.append(ChildRecord.model_validate(obj))
            except ValidationError as e:
                err = e.errors()[0]
                loc = ".".join(str(x) for x in err["loc"]) or "record"
                raise RunDamaged(f, f"not a child record ({loc}: {err['msg']})", n) from None
        return out

    def growths(self) -> list[dict]:
        """growth.jsonl: one record per task ``cycleqd grow`` added (see :mod:`cycleqd.runs.history`)."""
        return [obj for _, obj in read_jsonl(self.path / layout.GROWTH_LOG)]

    def stats(self) -> list[dict]:
        """stats.jsonl (a derived progress log for plots); unreadable lines are skipped."""
        out = []
        try:
            for _, obj in read_jsonl(self.path / self.STATS):
                out.append(obj)
        except RunDamaged:
            pass
        return out

    def seeds(self) -> dict[str, dict]:
        """{task: {"genome": id, "scores": {...}}} for the seed experts (generation 0).

        Raises:
            RunDamaged: seeds.json is not valid JSON of that shape.
        """
        f = self.path / self.SEEDS
        if not f.exists():
            return {}
        data = _read_json(f)
        if not isinstance(data, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("genome"), str) and isinstance(v.get("scores"), dict)
                for v in data.values()):
            raise RunDamaged(f, 'not a map of task -> {"genome": id, "scores": {...}}')
        return data

    def final_merge(self) -> dict | None:
        f = self.path / self.FINAL
        return _read_json(f) if f.exists() else None

    def models(self) -> dict[str, str] | None:
        """Fingerprints of the base and experts the run was started on (None before the first drive)."""
        f = self.path / self.MODELS
        return _read_json(f) if f.exists() else None

    def episodes_path(self, genome_id: str) -> Path:
        return self.path / self.EPISODES / f"{genome_id}.jsonl"

    def episodes(self, genome_id: str) -> list[dict] | None:
        """The passing conversations recorded for ``genome_id`` (None when none were recorded).

        Raises:
            RunDamaged: a line that is not a JSON object.
        """
        f = self.episodes_path(genome_id)
        return [obj for _, obj in read_jsonl(f)] if f.is_file() else None

    def genome_path(self, genome_id: str) -> Path:
        return self.path / layout.genome_file(genome_id)

    def load_genome(self, genome_id: str):
        from cycleqd.model.genome import Genome

        p = self.genome_path(genome_id)
        if not p.exists():
            raise RunDamaged(p, f"genome {genome_id!r} is missing")
        self.check_genome(genome_id)
        try:
            return Genome.load(p, self.genome_shape())
        except Exception as e:  # the genome format's own errors do not name the file
            raise RunDamaged(p, f"not a readable genome ({e})") from None

    def genome_shape(self):
        """The :class:`~cycleqd.model.genome.GenomeShape` of this run's genomes, from headers only.

        K is the run's task count; with the base on disk, the tensor count, SVD size and
        layout follow from the base's safetensors headers and the SVD rank, and a delta
        term's tensors must be the base's. (With a Hub base not on disk, only K.)
        """
        if self._shape is None:
            from cycleqd.model.genome import GenomeShape

            cfg = self.config()
            shape = GenomeShape(experts=len(cfg.task_names))
            if Path(cfg.models.base).is_dir():
                try:
                    from cycleqd.model.experts import inspect_model

                    from cycleqd.model.adapters import expert_kind
                    from cycleqd.model.lora import genome_shape

                    if expert_kind(cfg) == "lora":
                        shape = genome_shape(cfg)
                    else:
                        info = inspect_model(cfg.models.base, cfg.models.revision)
                        shape = GenomeShape.from_models(cfg.task_names, info.shapes, cfg.evolution.mutation.rank)
                except Exception:  # noqa: BLE001 - an unreadable base is the models' check's to report
                    pass
            self._shape = shape
        return self._shape

    def genome_problem(self, genome_id: str, *, values: bool = True, deltas: bool = True) -> str | None:
        """What is wrong with a genome of this run (see :func:`cycleqd.model.genome.genome_problem`), or None."""
        from cycleqd.model.genome import genome_problem

        p = self.genome_path(genome_id)
        if not p.is_file():
            return "missing"
        return genome_problem(p, self.genome_shape(), values=values, deltas=deltas)

    def check_genome(self, genome_id: str, *, deltas: bool = False) -> None:
        """Check that a genome file is there, whole and of the run's shape, with finite coefficients in range.

        Reads the bounded header, then the coefficients (small); with ``deltas`` also the
        full tensors of delta terms.

        Raises:
            RunDamaged: missing, oversized, malformed, or non-finite / out-of-range values.
        """
        p = self.genome_path(genome_id)
        if not p.is_file():
            raise RunDamaged(p, f"genome {genome_id!r} is missing")
        problem = self.genome_problem(genome_id, deltas=deltas)
        if problem:
            raise RunDamaged(p, problem)

    @property
    def plots_dir(self) -> Path:
        return self.path / layout.PLOTS

    # -- writing ---------------------------------------------------------------
    def commit(self, record: ChildRecord | SeedRecord, genome: bytes | None,
               episodes: Sequence[dict] | None, archive: Archive, *, snapshot: bool = True) -> None:
        """Make one evaluated model durable, in write-ahead order; the one write per child.

        1. its genome file (when it was built) and its passing conversations (``episodes``,
           when given), so that what the log points at exists;
        2. the log entry: a child's line in children.jsonl, flushed and fsynced, or a seed
           expert's entry in seeds.json (in task order);
        3. the derived files: the snapshot of ``archive`` (the archives after this model
           was offered) and a stats line (for seeds, once every seed is in).

        A kill between any two steps loses nothing: a resume replays the archives from the
        seeds and the log, and a genome without a line is overwritten by the child's re-run.
        With ``snapshot=False`` the archive snapshot is left as it was (the loop writes it at
        most every few seconds and at the end: readers replay a stale one, see
        :meth:`cycleqd.runs.folder.RunFolder.snapshot`).

        With a :meth:`start_syncer` running (``evolution.fsync: batch``) the genome, episodes and
        log line are written without waiting for fsync and fsynced in that order by a background
        thread (:mod:`cycleqd.runs.durable`): a killed driver still loses nothing.
        """
        gid = record.genome if isinstance(record, SeedRecord) else record.id
        syncer = self.syncer
        if genome is not None and (isinstance(record, SeedRecord) or record.ok):
            self._write_child_file(self.genome_path(gid), genome, syncer)
        if episodes is not None:
            self._write_child_file(self.episodes_path(gid), "".join(json.dumps(e) + "\n" for e in episodes), syncer)
        if isinstance(record, SeedRecord):
            order = self.config().task_names
            seeds = {**self.seeds(), record.task: {"genome": record.genome, "scores": dict(record.scores),
                                                   "truncated": dict(record.truncated)}}
            write_atomic(self.path / self.SEEDS, json.dumps({t: seeds[t] for t in order if t in seeds}, indent=1))
            generation, stats = 0, len(seeds) == len(order)
        else:
            self._append(self.CHILDREN, json.loads(record.to_line()), durable=syncer is None)
            if syncer is not None:
                syncer.add(self.path / self.CHILDREN)
            generation, stats = record.generation, True
        if snapshot:
            self.write_archives(archive.to_json(generation))
        if stats:  # derived (plots): not fsynced, a torn or lost line is skipped or redrawn
            self._append(self.STATS, {"generation": generation,
                                      "archives": {t: archive.stats(t) for t in archive.tasks}}, durable=False)

    @staticmethod
    def _write_child_file(path: Path, data: bytes | str, syncer: Any) -> None:
        if syncer is None:
            write_atomic(path, data)
        else:
            write_atomic(path, data, durable=False)
            syncer.add(path)

    def start_syncer(self) -> None:
        """Fsync the children's files in a background thread from now on (``evolution.fsync: batch``)."""
        if self.syncer is None:
            from cycleqd.runs.durable import Syncer

            self.syncer = Syncer()

    def stop_syncer(self) -> None:
        """Wait until every write handed to the syncer is fsynced, then fsync inline again."""
        syncer, self.syncer = self.syncer, None
        if syncer is not None:
            syncer.close()

    def save_genome(self, genome_id: str, data: bytes) -> None:
        write_atomic(self.genome_path(genome_id), data)

    def save_seeds(self, seeds: dict[str, dict]) -> None:
        write_atomic(self.path / self.SEEDS, json.dumps(seeds, indent=1))

    def save_models(self, fingerprints: dict[str, str]) -> None:
        write_atomic(self.path / self.MODELS, json.dumps(fingerprints, indent=1))

    def _append(self, name: str, record: dict, *, durable: bool = True) -> None:
        """Append ``record`` as one JSON line to the log ``name``."""
        f = self.path / name
        size = f.stat().st_size if f.exists() else 0
        # drop a torn tail first so the new line starts on a line boundary (unless this store wrote the tail)
        if size and self._tails.get(name) != size:
            with open(f, "rb+") as h:
                h.seek(-1, os.SEEK_END)
                if h.read(1) != b"\n":
                    h.truncate(_last_newline(h) + 1)
        with open(f, "a") as h:
            h.write(json.dumps(record) + "\n")
            h.flush()
            if durable:
                os.fsync(h.fileno())
            self._tails[name] = h.tell()

    def write_archives(self, snapshot: dict) -> None:
        write_atomic(self.path / self.ARCHIVES, json.dumps(snapshot))

    def write_final_merge(self, record: dict) -> None:
        write_atomic(self.path / self.FINAL, json.dumps(record, indent=1))

    def write_search_state(self, state: dict) -> None:
        """RUN/search.json: a coefficient search's state (:meth:`CoefficientSearch.state`), a view of the log."""
        write_atomic(self.path / layout.SEARCH, json.dumps(state, indent=1))

    def search_state(self) -> dict | None:
        """RUN/search.json as written (None when the run's search keeps none)."""
        f = self.path / layout.SEARCH
        return _read_json(f) if f.exists() else None


def _last_newline(h) -> int:
    """Offset of the last newline of an open file (-1 if none), read backwards in chunks."""
    end = h.seek(0, os.SEEK_END)
    while end > 0:
        start = max(0, end - (1 << 20))
        h.seek(start)
        i = h.read(end - start).rfind(b"\n")
        if i >= 0:
            return start + i
        end = start
    return -1


def model_fingerprints(cfg: Config) -> dict[str, str]:
    """{"base": ..., "expert_<task>": ...}: fingerprints of the weights a run's genomes are written against."""
    from cycleqd.model.experts import model_fingerprint

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
