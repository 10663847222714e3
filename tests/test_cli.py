"""The command line: bad input gives exit code 2, one clear line, nothing written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cycleqd.cli import main


@pytest.fixture(scope="module")
def good_config(tiny_family, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("cli")
    texts = d / "texts.txt"
    texts.write_text("abc def\nghi jkl\n")
    return {
        "name": "cli",
        "models": {"base": str(tiny_family["base"]), "experts": {t: str(tiny_family[t]) for t in "abc"}},
        "tasks": [{"name": t, "kind": "likelihood", "data": str(texts)} for t in "abc"],
        "evolution": {"generations": 2, "workers": 1},
    }


def _write(tmp_path: Path, cfg) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return str(p)


def _edit(cfg: dict, path: list, value) -> dict:
    import copy

    c = copy.deepcopy(cfg)
    node = c
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return c


BAD_CONFIGS = {
    "unknown_key": (["surprise"], 1, "surprise"),
    "unknown_crossover": (["evolution", "crossover"], {"name": "lineer"}, "did you mean 'linear'"),
    "unknown_mutation": (["evolution", "mutation"], {"name": "svdd"}, "did you mean 'svd'"),
    "unknown_task_kind": (["tasks", 0, "kind"], "mbp", "did you mean 'mbpp'"),
    "bad_bins": (["tasks", 0, "bins"], {"lo": 0.8, "hi": 0.2}, "lo < hi"),
    "zero_bins": (["tasks", 1, "bins"], {"count": 0}, "count"),
    "missing_model": (["models", "base"], "./no/such/model", "does not exist"),
    "missing_data": (["tasks", 2, "data"], "/no/such/texts.txt", "does not exist"),
    "expert_missing_for_task": (["models", "experts"], {"a": "x/y", "b": "x/y"}, "no expert for task"),
    "one_task": (["tasks"], [{"name": "a", "kind": "likelihood"}], "at least 2 tasks"),
    "negative_generations": (["evolution", "generations"], -1, "generations"),
    "bad_sampling_name": (["evolution", "sampling"], {"name": "elitist"}, "did you mean 'elite'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exit_2_one_line_nothing_written(case, good_config, tmp_path, capsys):
    path, value, needle = BAD_CONFIGS[case]
    cfg = _write(tmp_path, _edit(good_config, path, value))
    run = tmp_path / "run"
    code = main(["evolve", "--config", cfg, "--run-dir", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not run.exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--tasks", "a,zz"], "unknown task 'zz'"),
        (["--tasks", "a"], "at least 2"),
        (["--generations", "-3"], "--generations"),
        (["--workers", "0"], "--workers"),
        (["--generations", "many"], "invalid int"),
    ],
)
def test_bad_flags(args, needle, good_config, tmp_path, capsys):
    cfg = _write(tmp_path, good_config)
    run = tmp_path / "run"
    try:
        code = main(["evolve", "--config", cfg, "--run-dir", str(run), *args])
    except SystemExit as e:  # argparse's own type errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not run.exists()


@pytest.mark.parametrize(
    "text,needle", [("", "got empty"), ("[1, 2]", "got list"), ("tasks: [unclosed\n  - x: {", "not valid YAML")]
)
def test_unreadable_configs(text, needle, tmp_path, capsys):
    code = main(["evolve", "--config", _write(tmp_path, text), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["evolve", "--config", "/no/such.yaml"],
        ["resume", "/no/run/here"],
        ["show", "/no/run/here"],
        ["show", "/no/run/here", "--json"],
        ["heatmap", "/no/run/here"],
        ["report", "/no/run/here"],
        ["export", "/no/run/here", "--archive", "x", "--cell", "a,b", "--out", "/tmp/cycleqd-never"],
        ["export", "/no/run/here", "--best", "mean", "--out", "/tmp/cycleqd-never"],
        ["score", "mbpp", "--data", "/no/such.jsonl"],
    ],
)
def test_missing_paths(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not Path("/tmp/cycleqd-never").exists()


def test_existing_run_dir_is_refused(good_config, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "something").write_text("x")
    code = main(["evolve", "--config", _write(tmp_path, good_config), "--run-dir", str(run)])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["something"]


def test_console_script_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "cycleqd.cli", "--help"], capture_output=True, text=True).stdout
    for cmd in ["evolve", "resume", "check", "prepare", "show", "heatmap", "report", "export", "score", "mini"]:
        assert cmd in out
