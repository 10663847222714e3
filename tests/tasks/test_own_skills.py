"""Bring your own skill: task classes from a package outside cycleqd (tests/plugins/demo_skills), by import
path and by entry point; bad paths are one line and exit 2 before anything loads; a foreign class
drives one archive axis of a mini run."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from run_helpers import cli

from cycleqd.config import ConfigError, SandboxConfig, TaskConfig, check_task_options, parse_config
from cycleqd.registry import Registry, UnknownNameError

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


@pytest.fixture
def plugins(monkeypatch) -> Path:
    """tests/plugins on sys.path here and on PYTHONPATH for subprocesses (as an installed package would be)."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]))
    return PLUGINS


def _cfg(tiny_family, tmp_path: Path, kind: str) -> dict:
    (tmp_path / "t.txt").write_text("abc def\n")
    tasks = [{"name": t, "kind": "likelihood", "data": str(tmp_path / "t.txt")} for t in "ab"]
    tasks.append({"name": "c", "kind": kind})
    return {"name": "own", "models": {"base": str(tiny_family["base"]),
                                      "experts": {t: str(tiny_family[t]) for t in "abc"}},
            "tasks": tasks, "evolution": {"generations": 2, "workers": 1}, "prepare_cache": str(tmp_path / "cache")}


@pytest.mark.parametrize("kind, says", [
    ("demo_skills.duck:Uper", "has no 'Uper'; did you mean 'Upper'?"),
    ("demo_skill.duck:Upper", "no module named 'demo_skill'; did you mean 'demo_skills'?"),
    ("demo_skills.duk:Upper", "no module named 'demo_skills.duk'; did you mean 'duck'?"),
    ("demo_skills.duck:NotATask", "is not a Task class"),
    ("shell_txt", "did you mean 'shell_text'?"),
])
def test_bad_import_path_is_one_line_exit_2_nothing_written(plugins, tiny_family, tmp_path, kind, says):
    """A typo in a class name, a module name or an entry point, or a class that is no task: exit 2
    with one line that suggests the name meant, in seconds, no run folder written and Ray never imported."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg(tiny_family, tmp_path, kind)))
    t0 = time.monotonic()
    code, ray, err = cli("evolve", "--config", str(path), "--run-dir", str(tmp_path / "run"))
    assert code == 2 and not ray, (code, err)
    assert len(err.splitlines()) == 1 and says in err, err
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run").exists()


def test_entry_point_group_names_a_kind(plugins):
    """An installed package's ``cycleqd.tasks`` entry point is a kind like a built-in one, listed with them."""
    from demo_skills.skills import ShellText

    reg = Registry("task", {"mini_shell": "cycleqd.tasks.mini_shell"}, entry_points="cycleqd.tasks")
    assert reg.get("shell_text") is ShellText and "shell_text" in reg.names()
    with pytest.raises(UnknownNameError, match="did you mean 'shell_text'"):
        reg.check("shel_text")


def test_import_path_class_options_are_checked(plugins):
    """A package's class declares its options model: a typo is "did you mean"; a class without one is
    checked against its constructor's keywords."""
    with pytest.raises(ConfigError, match="unknown option 'nn'; did you mean 'n'"):
        check_task_options(TaskConfig(name="s", kind="demo_skills.skills:ShellText", options={"nn": 3}))
    assert check_task_options(TaskConfig(name="s", kind="demo_skills.skills:ShellText", options={"n": 3})).n == 3
    with pytest.raises(ConfigError, match="unknown option 'word'; did you mean 'words'"):
        check_task_options(TaskConfig(name="u", kind="demo_skills.duck:Upper", options={"word": 3}))
    check_task_options(TaskConfig(name="u", kind="demo_skills.duck:Upper", options={"words": 3}))


def test_preflight_reads_executes_code_of_a_foreign_class(plugins, tmp_path):
    """``executes_code`` of a package's class is checked against the sandbox setting; a class that does
    not declare it counts as running model code."""
    from cycleqd.evolve.preflight import check_code_execution

    (tmp_path / "t.txt").write_text("abc\n")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "silent_skill.py").write_text("class Quiet:\n    def sample_ids(self): return []\n"
                                         "    def evaluate(self, engine, ids=None): pass\n")
    import sys
    sys.path.insert(0, str(pkg))
    try:
        base = {"name": "x", "models": {"base": "b", "experts": {"a": "e", "q": "e"}},
                "tasks": [{"name": "a", "kind": "likelihood", "data": str(tmp_path / "t.txt")}]}
        ok = parse_config({**base, "tasks": base["tasks"] + [{"name": "q", "kind": "demo_skills.duck:Upper"}]})
        check_code_execution(ok)  # declares executes_code = False
        quiet = parse_config({**base, "tasks": base["tasks"] + [{"name": "q", "kind": "silent_skill:Quiet"}]})
        with pytest.raises(ConfigError, match="task.s. q run model-written code"):
            check_code_execution(quiet)
    finally:
        sys.path.remove(str(pkg))


def test_duck_typed_class_scores_through_the_protocol(plugins):
    """A class with only the protocol's shape (old import paths cycleqd.engine.base / cycleqd.tasks.base,
    no Options, no answer) is wrapped: answer() evaluates, requests without sample ids are accepted."""
    from cycleqd.engine.protocol import Engine
    from cycleqd.tasks.foreign import ForeignTask, make_task

    class Shout(Engine):
        def generate(self, requests):
            self.note_answers([False] * len(requests))
            return [r.messages[0]["content"].split()[-1].upper() for r in requests]

    task = make_task("demo_skills.duck:Upper", name="upper", sandbox=SandboxConfig(), words=3)
    assert isinstance(task, ForeignTask) and not task.executes_code and task.sample_ids() == ["0", "1", "2"]
    result = task.answer(Shout())()
    assert result.quality == 1.0 and [s.id for s in result.samples] == ["0", "1", "2"]


def test_plugin_task_drives_an_axis_of_a_mini_run(plugins, small_world, tmp_path):
    """A mini run whose third axis is ``kind: demo_skills.skills:ShellText`` (a package outside cycleqd):
    seeds and children are scored on it, its archive holds elites, and every line of children.jsonl
    carries the children's truncation shares."""
    from mini_run import make_mini_run

    run = make_mini_run(tmp_path, small_world, "small", n=8, record=False,
                        edit=lambda data: data["tasks"][2].update(kind="demo_skills.skills:ShellText",
                                                                   options={"n": 12}))
    from cycleqd.runs.folder import RunFolder

    folder = RunFolder(run)
    assert folder.tasks == ["code", "sql", "shell"] and folder.config.tasks[2].kind == "demo_skills.skills:ShellText"
    assert folder.seeds["shell"]["scores"]["shell"] > 0.0  # the shell expert writes some gold commands
    assert folder.snapshot().archives["shell"]["elites"]
    lines = [json.loads(x) for x in (run / "children.jsonl").read_text().splitlines()]
    assert lines and all(set(x["truncated"]) == {"code", "sql", "shell"} for x in lines if x["error"] is None)
