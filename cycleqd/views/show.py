"""``cycleqd show``: the archives' elites and the run's progress as rich tables."""
from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from cycleqd.runs.folder import ArchiveSnapshot, RunFolder

__all__ = ["render_show", "elite_rows"]


def elite_rows(snap: ArchiveSnapshot, task: str, parents: dict[str, list[str]]) -> list[dict]:
    """Elites of ``task``'s archive, best first, each with its parents' genome ids."""
    elites = sorted(snap.archives[task]["elites"], key=lambda e: (-e["quality"], e["cell"]))
    return [{**e, "parents": parents.get(e["genome"], [])} for e in elites]


def render_show(run_dir: str | Path, console: Console | None = None, *, top: int | None = None) -> None:
    """Print one table per archive (cell, every task's score with the archive's own task, its
    quality, in bold, the mean, generation, genome, parents), best elite first, then the
    run's summary and final merge.

    Args:
        top: at most this many elites per archive (default: all).

    Raises:
        ConfigError: ``run_dir`` is not a run folder.
    """
    console = console or Console()
    run = RunFolder(run_dir)
    store = run.store
    snap = run.snapshot()
    parents = run.parents
    failed = sum(1 for c in run.children if not c.ok)

    for task in snap.tasks:
        arch = snap.archives[task]
        others = snap.other_tasks(task)
        rows = elite_rows(snap, task, parents)
        shown = rows if top is None else rows[:top]
        title = (f"archive {task}: {len(rows)} elites, coverage {arch['coverage']:.1%}, "
                 f"QD score {arch['qd_score']:.4f}, best {arch['best']:.4f}; cell = bins of {', '.join(others)}")
        # Numbers never wrap; only the parents column folds in a narrow terminal.
        table = Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("cell", no_wrap=True)
        for t in snap.tasks:  # the archive's own task is its quality: bold
            table.add_column(t, justify="right", no_wrap=True, style="bold" if t == task else None)
        table.add_column("mean", justify="right", no_wrap=True)
        table.add_column("gen", justify="right", no_wrap=True)
        table.add_column("genome", no_wrap=True)
        table.add_column("parents", overflow="fold")
        for e in shown:
            scores = [e["scores"].get(t) for t in snap.tasks]
            mean = sum(scores) / len(scores) if all(s is not None for s in scores) else None
            table.add_row(
                ",".join(str(i) for i in e["cell"]),
                *[f"{s:.4f}" if s is not None else "-" for s in scores],
                f"{mean:.4f}" if mean is not None else "-",
                str(e["generation"]),
                e["genome"],
                " ".join(e["parents"]) or ("seed expert" if e["genome"].startswith("seed_") else "-"),
            )
        if top is not None and len(rows) > top:
            table.caption = f"{len(rows) - top} more elites not shown"
        console.print(table)

    summary = Table(title="run", title_justify="left", show_header=False, box=box.SIMPLE, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("folder", str(store.path))
    summary.add_row("generation", f"{snap.generation} finished children ({failed} failed)")
    why = run.stale()
    if why:
        summary.add_row("archives.json", f"{why}; shown as rebuilt from seeds.json and children.jsonl")
    summary.add_row("tasks", ", ".join(snap.tasks))
    for task in snap.tasks:
        a = snap.archives[task]
        summary.add_row(f"archive {task}", f"coverage {a['coverage']:.1%}  QD score {a['qd_score']:.4f}  "
                                           f"best {a['best']:.4f}")
    search = run.config.evolution.search.name
    if search != "cycleqd":
        summary.add_row("search", f"{search} (RUN/search.json)")
    if search == "nsga2":  # NSGA-II's archive: the children no other child beats on every task
        front = run.front(snap.generation)
        summary.add_row("Pareto front", f"{len(front)} children: " + "  ".join(
            f"{f['genome']} (" + " ".join(f"{f['scores'][t]:.3f}" for t in snap.tasks) + ")" for f in front))
    final = store.final_merge()
    if final:
        scores = "  ".join(f"{t} {v:.4f}" for t, v in (final.get("scores") or {}).items())
        err = f"  error: {final['error']}" if final.get("error") else ""
        summary.add_row("final merge", f"{scores}  mean {final.get('mean', float('nan')):.4f}{err}")
    console.print(summary)
