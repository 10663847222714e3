"""A run folder written before the package was laid out in folders still resumes.

``tests/data/run_v0/`` holds a 4-child run over two likelihood tasks, written by cycleqd
before its modules moved into ``model/``, ``search/``, ``runs/`` ... (commit ac2f3a7).
Its tiny models are rebuilt here from the same seed, so their fingerprints match the
run's ``models.json``; only the machine-specific root of its paths is moved.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from run_helpers import local_ray
from tiny_models import make_tiny_family

from cycleqd.runs.folder import RunFolder

OLD = Path(__file__).resolve().parents[1] / "data" / "run_v0"
OLD_ROOT = "/tmp/oldrun/root"  # where the folder was written


def _relocated(tmp_path: Path) -> Path:
    shutil.copytree(OLD, tmp_path, dirs_exist_ok=True)
    make_tiny_family(tmp_path / "family", tasks=("a", "b"))
    cfg = tmp_path / "run" / "config.yaml"
    cfg.write_text(cfg.read_text().replace(OLD_ROOT, str(tmp_path)))
    return tmp_path / "run"


def test_a_run_folder_of_the_old_layout_resumes_without_losing_a_child(tmp_path):
    from cycleqd.evolve.loop import resume

    run = _relocated(tmp_path)
    old_log = (run / "children.jsonl").read_bytes()
    old_archives = json.loads((run / "archives.json").read_text())["archives"]
    assert RunFolder(run).generation == 4

    local_ray()
    resume(run, generations=7, progress=False)

    folder = RunFolder(run)
    assert folder.generation == 7
    assert (run / "children.jsonl").read_bytes().startswith(old_log)  # the old lines stay as they were
    assert all(c.ok and folder.store.genome_path(c.id).is_file() for c in folder.children)
    # the old archives are what the new code replays from the old log
    assert folder.archive(4).to_json(4)["archives"] == old_archives
