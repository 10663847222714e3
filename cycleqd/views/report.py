"""``cycleqd report``: one self-contained HTML page per run.

The page inlines its images as base64 data URIs and its style sheet, and links
nothing outside itself, so it opens offline and can be mailed around as a
single file. It holds the heatmaps, the history plots, the best elites, the
final merge, the lineage of the best model and the resolved config.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Iterable

from cycleqd.atomic import write_atomic
from cycleqd.runs.folder import RunFolder, best_by_mean, lineage
from cycleqd.views.plots import write_heatmaps, write_history

__all__ = ["write_report", "best_by_mean", "lineage", "REPORT_NAME"]

REPORT_NAME = "report.html"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1400px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f6f6f6; } td.l, th.l { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
ul.tree, ul.tree ul { list-style: none; padding-left: 1.4em; border-left: 1px dotted #bbb; }
ul.tree li { margin: 0.15em 0; } code { background: #f3f3f3; padding: 0 0.25em; }
.muted { color: #777; }
"""


def _e(x: object) -> str:
    return html.escape(str(x))


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _tree_html(node: dict, info: dict[str, str]) -> str:
    label = f"<code>{_e(node['id'])}</code>"
    if node["id"] in info:
        label += f' <span class="muted">{_e(info[node["id"]])}</span>'
    if node["repeat"]:
        label += ' <span class="muted">(shown above)</span>'
    if node["cut"]:
        label += ' <span class="muted">(older ancestors not shown)</span>'
    kids = "".join(_tree_html(p, info) for p in node["parents"])
    return f"<li>{label}{f'<ul>{kids}</ul>' if kids else ''}</li>"


def _table(headers: list[str], rows: Iterable[list[str]], left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(run_dir: str | Path, *, top: int = 10) -> Path:
    """Write RUN/report.html and return its path.

    Draws fresh heatmaps and history plots (into RUN/plots) and inlines them.

    Raises:
        ConfigError: ``run_dir`` is not a run folder (or has no archives yet).
    """
    run = RunFolder(run_dir)
    store = run.store
    snap = run.snapshot()
    cfg_text = (store.path / store.CONFIG).read_text()
    children = run.children
    parents = run.parents
    final = store.final_merge()
    ranked = best_by_mean(snap)
    name = run.config.name

    # Fresh pictures in RUN/plots (PNG to inline, SVG to keep), then inlined.
    drawn = write_heatmaps(store.path, store.plots_dir, per_archive=False) + write_history(store.path, store.plots_dir)
    images = {p.stem: _img(p, p.stem) for p in drawn if p.suffix == ".png"}

    parts = [f"<h1>CycleQD run <code>{_e(name)}</code></h1>"]
    failed = sum(1 for c in children if not c.ok)
    parts.append(
        f"<p>{snap.generation} finished children ({failed} failed), tasks {_e(', '.join(snap.tasks))}. "
        f'Folder <code>{_e(store.path.resolve())}</code>.</p>'
    )
    parts.append(_table(
        ["archive", "elites", "coverage", "QD score", "best"],
        [[_e(t), str(len(snap.archives[t]["elites"])), f"{snap.archives[t]['coverage']:.1%}",
          _fmt(snap.archives[t]["qd_score"]), _fmt(snap.archives[t]["best"])] for t in snap.tasks],
    ))

    parts.append("<h2>Archives</h2>")
    parts.append('<p class="muted">Colour: quality on the archive\'s task; axes: the other tasks\' scores (one '
                 "cell per bin); red outlines: the seed experts' cells.</p>")
    parts.append(images.get("heatmaps", "<p>no heatmaps</p>"))
    parts.append("<h2>History</h2>")
    parts.append(images.get("history", '<p class="muted">no history yet</p>'))

    parts.append(f"<h2>Top {min(top, len(ranked))} models by mean score</h2>")
    rows = []
    for r in ranked[:top]:
        rows.append([f"<code>{_e(r['genome'])}</code>", _e(", ".join(r["archives"])), str(r["generation"]),
                     *[_fmt(r["scores"].get(t)) for t in snap.tasks], f"<b>{_fmt(r['mean'])}</b>",
                     _e(" + ".join(parents.get(r["genome"], [])) or "-")])
    parts.append(_table(["genome", "in archives", "generation", *snap.tasks, "mean", "parents"], rows, left=2))

    trunc = run.truncation()
    parts.append("<h2>Truncation</h2>")
    parts.append(f'<p class="muted">Share of answers that stopped at max_new_tokens, over the seed experts and '
                 f"children; a share above {trunc['threshold']:.0%} means the limit, not the skill, may be "
                 "what is scored.</p>")
    parts.append(_table(["task", "mean share", "largest share", "models over threshold"],
                        [[_e(t), f"{v['mean']:.1%}", f"{v['max']:.1%}", f"{v['over_threshold']} of {v['models']}"]
                         for t, v in trunc["tasks"].items()]) if trunc["tasks"] else
                 '<p class="muted">not recorded</p>')

    parts.append("<h2>Final merge</h2>")
    if final:
        w = ", ".join(f"{t}: {v:.3f}" for t, v in (final.get("weights") or {}).items())
        src = ", ".join(f"{t}: {g}" for t, g in (final.get("sources") or {}).items())
        parts.append(f"<p>theta = theta_base + sum_k beta_k tau_k over the best elite of each archive "
                     f"(beta = softmax of their qualities). Weights: {_e(w)}."
                     + (f" Sources: {_e(src)}." if src else "") + "</p>")
        if final.get("error"):
            parts.append(f"<p>evaluation failed: <code>{_e(final['error'])}</code></p>")
        else:
            parts.append(_table(["genome", *snap.tasks, "mean"], [[
                f"<code>{_e(final.get('genome'))}</code>",
                *[_fmt((final.get("scores") or {}).get(t)) for t in snap.tasks], f"<b>{_fmt(final.get('mean'))}</b>",
            ]]))
    else:
        parts.append('<p class="muted">none (the run has not finished, or final_merge is off)</p>')

    parts.append("<h2>Lineage of the best model</h2>")
    if ranked:
        best = ranked[0]
        info = {c.id: f"generation {c.generation}, quality task {c.quality_task}, mean "
                      f"{_fmt(sum(c.scores.values()) / len(c.scores))}"
                for c in children if c.scores}
        for t, s in run.seeds.items():
            info[s["genome"]] = f"seed expert for {t}"
        tree = run.lineage(best["genome"])
        parts.append(f'<ul class="tree">{_tree_html(tree, info)}</ul>')
    else:
        parts.append('<p class="muted">no elites</p>')

    parts.append("<h2>Resolved config</h2>")
    parts.append(f"<pre>{_e(cfg_text)}</pre>")

    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>CycleQD run {_e(name)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    out = store.path / REPORT_NAME
    write_atomic(out, page)
    out.chmod(0o644)  # a page to open in any browser, not a secret
    return out
