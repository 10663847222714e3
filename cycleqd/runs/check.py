"""``cycleqd check RUN [--repair]``: what in a run folder can be trusted, fsck-like.

It reads every file a resume reads (config, seeds, the log line by line, the
genome of every logged child and seed expert, the archive snapshot, the final
merge, stats) and reports each problem with the file (and line). ``--repair``
moves what cannot be trusted into ``RUN/quarantine/<time>/`` (never deleting
anything) and leaves a folder that resumes:

- bad lines of children.jsonl (not JSON, not a record, a repeated child) are
  dropped from the log; the original log is kept in quarantine;
- a logged child whose genome is missing or truncated stays in the log, marked
  failed, so its lineage is kept and it is no longer offered to the archives;
- a seed expert whose genome is bad, or an unreadable seeds.json, is dropped so
  the next resume evaluates the seed experts again;
- archives.json and stats.jsonl are rebuilt from the seeds and the log;
- a bad final merge, an unreadable models.json and temp files of killed writers
  are moved aside.

After dropped lines the remaining records are renumbered, so a record's
``generation`` is again its line in the log.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pydantic import ValidationError

from cycleqd.atomic import write_atomic
from cycleqd.bounded import MAX_LINE_BYTES, iter_lines, loads_bounded
from cycleqd.runs import layout
from cycleqd.runs.lock import RunLock
from cycleqd.runs.store import RunDamaged, RunStore
from cycleqd.search.child import ChildRecord

__all__ = ["CheckReport", "Finding", "check_run"]


@dataclass(frozen=True)
class Finding:
    """One problem: the file (relative to the run), the line if any, what is wrong, what repair does."""

    file: str
    problem: str
    repair: str
    line: int | None = None

    def format(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.problem} (repair: {self.repair})"


@dataclass
class CheckReport:
    """What :func:`check_run` found (and, with ``repaired``, fixed)."""

    run: Path
    generation: int = 0
    seeds: int = 0
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: bool = False
    quarantine: Path | None = None

    @property
    def ok(self) -> bool:
        """True if nothing is wrong now (nothing found, or everything repaired)."""
        return not self.findings or self.repaired

    def format(self) -> str:
        head = (f"{self.run}: generation {self.generation} ({self.generation} children logged), "
                f"{self.seeds} seed experts")
        if not self.findings:
            return "\n".join([head + "; nothing wrong", *("  note: " + n for n in self.notes)])
        lines = [head + f"; {len(self.findings)} problem(s)" + (", repaired" if self.repaired else "")]
        lines += ["  " + f.format() for f in self.findings]
        lines += ["  note: " + n for n in self.notes]
        if self.quarantine is not None:
            lines.append(f"  moved aside into {self.quarantine}")
        elif not self.repaired:
            lines.append(f"  `cycleqd check {self.run} --repair` moves these into quarantine/ and rebuilds the rest")
        return "\n".join(lines)


def _lines(path: Path) -> Iterator[tuple[int, bytes | None, bool]]:
    """(line number, line or None when over the size bound, complete) per line, read bounded."""
    if path.exists():
        yield from iter_lines(path)


def _loads(line: bytes) -> object:
    return loads_bounded(line, max_bytes=MAX_LINE_BYTES)


@dataclass
class _Scan:
    """What the read-only pass found, for the repair pass."""

    seeds: dict[str, dict] = field(default_factory=dict)
    bad_seed_file: bool = False
    bad_seeds: list[str] = field(default_factory=list)
    kept: list[ChildRecord] = field(default_factory=list)
    rewrite_log: bool = False
    bad_final: str | None = None
    bad_stats: bool = False
    temps: list[Path] = field(default_factory=list)


def check_run(run_dir: str | Path, *, repair: bool = False) -> CheckReport:
    """Check (and with ``repair`` fix) a run folder. See the module docstring.

    Raises:
        RunNotFound: not a run folder; RunLocked: a driver holds it (checking only reads,
        but a repair while a driver writes would race it, so both refuse).
    """
    store = RunStore(run_dir)
    store.config()  # an unreadable config is bad input: nothing to check against
    report = CheckReport(store.path)
    with RunLock(store.path):
        scan = _Scan()
        _check_seeds(store, report, scan)
        _check_log(store, report, scan)
        _check_derived(store, report, scan)
        report.generation, report.seeds = len(scan.kept), len(scan.seeds) - len(scan.bad_seeds)
        if repair and report.findings:
            _repair(store, report, scan)
    return report


def _check_seeds(store: RunStore, report: CheckReport, scan: _Scan) -> None:
    again = "move aside; the seed experts are evaluated again"
    try:
        scan.seeds = store.seeds()
    except RunDamaged as e:
        scan.bad_seed_file = True
        report.findings.append(Finding(RunStore.SEEDS, str(e).split(": ", 1)[1].split(";")[0], again))
    for t, s in scan.seeds.items():
        problem = _genome_problem(store, s["genome"])
        if problem:
            scan.bad_seeds.append(t)
            report.findings.append(Finding(layout.genome_file(s['genome']), problem, again))


def _check_log(store: RunStore, report: CheckReport, scan: _Scan) -> None:
    """children.jsonl line by line: bad lines and repeats are dropped, children with bad genomes marked."""
    seen: set[str] = set()
    drop = "drop the line (kept in quarantine)"
    for n, line, complete in _lines(store.path / RunStore.CHILDREN):
        if line is None:
            report.findings.append(Finding(RunStore.CHILDREN, f"a line over {MAX_LINE_BYTES} bytes", drop, n))
            scan.rewrite_log = True
            continue
        if not complete:
            # harmless: every reader drops it and the next append cuts it off
            report.notes.append(f"{RunStore.CHILDREN}:{n}: torn last line of a killed writer (ignored)")
            continue
        if not line.strip():
            continue
        try:
            rec = ChildRecord.model_validate(_loads(line))
        except (ValueError, UnicodeDecodeError) as e:  # ValidationError and TooLarge are ValueErrors
            msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else (str(e).splitlines()[0][:200]
                                                                                 or type(e).__name__)
            report.findings.append(Finding(RunStore.CHILDREN, f"not a child record ({msg})", drop, n))
            scan.rewrite_log = True
            continue
        if rec.id in seen:
            report.findings.append(Finding(RunStore.CHILDREN, f"child {rec.id} logged again", "drop the repeat", n))
            scan.rewrite_log = True
            continue
        seen.add(rec.id)
        problem = _genome_problem(store, rec.id) if rec.ok else None
        if problem:
            report.findings.append(Finding(layout.genome_file(rec.id), problem,
                                           f"move aside; mark child {rec.id} failed", n))
            rec = rec.model_copy(update={"error": f"genome quarantined by cycleqd check: {problem}",
                                         "scores": {}, "inserted": ()})
            scan.rewrite_log = True
        scan.kept.append(rec)
    if any(r.generation != i for i, r in enumerate(scan.kept, 1)):
        scan.rewrite_log = True  # renumber: a record's generation is its line


def _check_derived(store: RunStore, report: CheckReport, scan: _Scan) -> None:
    """The files computed from seeds and log (archives, stats), the final merge, models.json, temp files."""
    run = store.path
    if not scan.seeds and not scan.bad_seed_file and scan.kept:
        report.findings.append(Finding(RunStore.SEEDS, f"missing while the log holds {len(scan.kept)} children",
                                       "none needed: a resume evaluates the seed experts again"))
    snap = store.archives()
    if scan.seeds and not scan.bad_seeds:
        rebuild = "rebuild from seeds and log"
        if snap is None:
            what = "unreadable" if (run / RunStore.ARCHIVES).exists() else "missing"
            report.findings.append(Finding(RunStore.ARCHIVES, what, rebuild))
        elif not isinstance(snap["generation"], int) or snap["generation"] != len(scan.kept) or scan.rewrite_log:
            report.findings.append(Finding(RunStore.ARCHIVES, f"at generation {snap['generation']}, "
                                           f"the log at {len(scan.kept)}", rebuild))
    try:
        final = store.final_merge()
    except RunDamaged:
        scan.bad_final = "unreadable"
    else:
        if final is not None and not (isinstance(final, dict) and isinstance(final.get("genome", ""), str)):
            scan.bad_final = "unreadable (not a final-merge record)"
        elif final and not final.get("error"):
            scan.bad_final = _genome_problem(store, final.get("genome") or "final_merge")
        else:
            scan.bad_final = None
    if scan.bad_final:
        report.findings.append(Finding(RunStore.FINAL, f"final merge {scan.bad_final}",
                                       "move aside; the next resume merges again"))
    try:
        store.models()
    except RunDamaged:
        report.findings.append(Finding(RunStore.MODELS, "unreadable", "move aside; recorded again"))
    scan.bad_stats = any(line is None or (complete and not _json_ok(line))
                         for _, line, complete in _lines(run / RunStore.STATS))
    if scan.bad_stats:
        report.findings.append(Finding(RunStore.STATS, "unreadable lines", "rebuild from seeds and log"))
    scan.temps = sorted([*run.glob(".*.tmp"), *(run / layout.GENOMES).glob(".*.tmp")])
    for p in scan.temps:
        report.findings.append(Finding(str(p.relative_to(run)), "temp file of a killed writer", "move aside"))


def _repair(store: RunStore, report: CheckReport, scan: _Scan) -> None:
    """Move what cannot be trusted into quarantine/<time>/ first, then write the trusted rest."""
    run = store.path
    q = run / layout.QUARANTINE / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while q.exists():
        n += 1
        q = q.with_name(f"{q.name.split('.')[0]}.{n}")

    def aside(rel: str, copy: bool = False) -> None:
        src = run / rel
        if src.exists():
            dst = q / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copy2 if copy else shutil.move)(str(src), str(dst))

    flagged = {f.file for f in report.findings}
    for p in scan.temps:
        aside(str(p.relative_to(run)))
    if scan.bad_seed_file:
        aside(RunStore.SEEDS)
    if scan.bad_seeds:
        for t in scan.bad_seeds:
            aside(layout.genome_file(scan.seeds[t]['genome']))
        aside(RunStore.SEEDS, copy=True)
        store.save_seeds({t: s for t, s in scan.seeds.items() if t not in scan.bad_seeds})
    for f in flagged:
        if f.startswith("genomes/g"):
            aside(f)
    kept = scan.kept
    if scan.rewrite_log:
        aside(RunStore.CHILDREN)
        kept = [r.model_copy(update={"generation": i}) for i, r in enumerate(kept, 1)]
        write_atomic(run / RunStore.CHILDREN, "".join(r.to_line() + "\n" for r in kept))
    if scan.bad_final:
        aside(RunStore.FINAL)
        aside(layout.genome_file("final_merge"))
    if RunStore.MODELS in flagged:
        aside(RunStore.MODELS)
    if RunStore.ARCHIVES in flagged:
        aside(RunStore.ARCHIVES)
    rebuild_stats = scan.bad_stats or scan.rewrite_log
    if rebuild_stats:
        aside(RunStore.STATS)
    if scan.seeds and not scan.bad_seed_file and not scan.bad_seeds:
        _rebuild(store, kept, rebuild_stats)
    else:
        aside(RunStore.ARCHIVES)  # archives without every seed expert are rebuilt once they are evaluated
    report.repaired, report.quarantine = True, q if q.exists() else None


def _json_ok(line: bytes) -> bool:
    if not line.strip():
        return True
    try:
        return isinstance(_loads(line), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _genome_problem(store: RunStore, gid: str) -> str | None:
    """Missing, malformed, oversized, not of the run's layout, or non-finite / out-of-range values."""
    return store.genome_problem(gid)


def _rebuild(store: RunStore, kept: list[ChildRecord], rebuild_stats: bool) -> None:
    """archives.json (and, if asked, stats.jsonl) from the seeds and the repaired log."""
    from cycleqd.runs.folder import RunFolder

    folder = RunFolder(store)
    archive = folder.archive(0)
    stats = [{"generation": 0, "archives": {t: archive.stats(t) for t in archive.tasks}}]
    for rec in kept:
        if rec.ok:
            archive.offer(rec.id, rec.scores, rec.generation)
        if rebuild_stats:
            stats.append({"generation": rec.generation, "archives": {t: archive.stats(t) for t in archive.tasks}})
    store.write_archives(archive.to_json(len(kept)))
    if rebuild_stats:
        write_atomic(store.path / RunStore.STATS, "".join(json.dumps(s) + "\n" for s in stats))
