"""``cycleqd report``: one self-contained HTML page, checked in a real headless browser."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from run_helpers import real_run

from cycleqd.config import ConfigError


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return real_run(tmp_path_factory)


@pytest.fixture(scope="module")
def report(run) -> Path:
    from cycleqd.views.report import write_report

    return write_report(run)


def test_report_is_one_offline_page_with_inlined_images(report, run):
    assert report.parent == run and report.suffix == ".html"
    page = report.read_text()
    # nothing the page loads lives outside it
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page, re.I)
    assert "<link" not in page and "<script" not in page
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert {alt for alt, _ in imgs} == {"heatmaps", "history"}
    for _, data in imgs:
        raw = base64.b64decode(data)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000


def test_report_content_comes_from_the_run(report, run):
    from cycleqd.views.plots import load_snapshot
    from cycleqd.views.report import best_by_mean, lineage

    page = report.read_text()
    snap = json.loads((run / "archives.json").read_text())
    ranked = best_by_mean(load_snapshot(run))
    best = ranked[0]
    elites = [e for t in snap["tasks"] for e in snap["archives"][t]["elites"]]
    assert best["mean"] == max(sum(e["scores"].values()) / len(e["scores"]) for e in elites)
    # the top table, best first
    order = [m for m in re.findall(r"<tr><td class=\"l\"><code>([^<]+)</code>", page)]
    assert order[: len(ranked[:10])] == [r["genome"] for r in ranked[:10]]
    # the lineage tree names every ancestor of the best model recorded in children.jsonl
    parents = {}
    for line in (run / "children.jsonl").read_text().splitlines():
        c = json.loads(line)
        parents[c["id"]] = c["parents"]
    tree_html = page.split("Lineage of the best model")[1].split("<h2>")[0]
    todo, seen = [best["genome"]], set()
    while todo:
        g = todo.pop()
        if g in seen:
            continue
        seen.add(g)
        assert f"<code>{g}</code>" in tree_html
        todo += parents.get(g, [])
    assert lineage(best["genome"], parents)["id"] == best["genome"]
    # final merge and the resolved config
    final = json.loads((run / "final_merge.json").read_text())
    assert f"{final['mean']:.4f}" in page
    assert "prepare_cache:" in page and "likelihood" in page


def test_lineage_marks_repeats_and_cuts():
    from cycleqd.views.report import lineage

    parents = {"c": ["b", "b"], "b": ["a", "s"], "a": ["s", "s"]}
    tree = lineage("c", parents, max_depth=2)
    assert [p["id"] for p in tree["parents"]] == ["b", "b"]
    assert tree["parents"][1]["repeat"] and not tree["parents"][0]["repeat"]
    a = tree["parents"][0]["parents"][0]
    assert a["id"] == "a" and a["cut"] and a["parents"] == []


def test_not_a_run(tmp_path):
    from cycleqd.views.report import write_report

    with pytest.raises(ConfigError):
        write_report(tmp_path)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _screenshot(html: Path, png: Path, profile: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1400,1600",
           "--hide-scrollbars", html.as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return mpimg.imread(png)[..., :3]


@pytest.mark.browser
def test_report_renders_its_images_in_a_browser(report, tmp_path):
    """Chromium draws the page; the inlined heatmaps show up as coloured pixels that vanish without them."""
    if _chromium() is None:
        pytest.skip("headless Chromium not installed (Debian package `chromium`)")
    page = report.read_text()
    without = tmp_path / "no_images.html"
    without.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', page))
    with_imgs = tmp_path / "report.html"
    with_imgs.write_text(page)
    shot = _screenshot(with_imgs, tmp_path / "with.png", tmp_path / "profile1")
    bare = _screenshot(without, tmp_path / "without.png", tmp_path / "profile2")

    def coloured(px: np.ndarray) -> int:
        return int(((px.max(-1) - px.min(-1)) > 0.15).sum())

    assert coloured(bare) < 500  # text and tables are grey/black
    assert coloured(shot) > 20 * max(coloured(bare), 100)
    # the heatmap image sits where its <img> is: below the "Archives" heading, in the upper part of the page
    rows = np.nonzero(((shot.max(-1) - shot.min(-1)) > 0.15).any(axis=1))[0]
    assert rows.min() > 100
