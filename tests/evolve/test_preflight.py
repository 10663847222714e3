"""Bad input is refused before anything is loaded or written: exit 2, one line, no run folder, no Ray."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml
from run_helpers import cli
from tiny_models import make_tiny_family


@pytest.fixture(scope="module")
def base_cfg(tiny_family, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("pre")
    (d / "t.txt").write_text("abc def\n")
    return {
        "name": "pre",
        "models": {"base": str(tiny_family["base"]), "experts": {t: str(tiny_family[t]) for t in "abc"}},
        "tasks": [{"name": t, "kind": "likelihood", "data": str(d / "t.txt")} for t in "abc"],
        "evolution": {"generations": 2, "workers": 1},
        "prepare_cache": str(d / "cache"),
    }


def _refused(tmp_path: Path, cfg: dict, *flags: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    code, ray, err = cli("evolve", "--config", str(path), "--run-dir", str(run), *flags)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not ray, "Ray was imported before the input was refused"
    assert not run.exists()
    assert not Path(cfg.get("prepare_cache", "/nonexistent")).exists()
    return err


def _mini_tasks(cfg: dict, options: dict | None = None) -> dict:
    c = copy.deepcopy(cfg)
    c["tasks"] = [{"name": "a", "kind": "mini_code", "options": {"n": 5, **(options or {})}},
                  {"name": "b", "kind": "mini_sql", "options": {"n": 5}},
                  {"name": "c", "kind": "mini_shell", "options": {"n": 5}}]
    c["sandbox"] = {"allow_code_execution": True}
    return c


def test_a_typo_in_a_task_option_says_did_you_mean(base_cfg, tmp_path):
    err = _refused(tmp_path, _mini_tasks(base_cfg, {"nn": 5}))
    assert "unknown option 'nn'; did you mean 'n'?" in err and "task a (mini_code)" in err


def test_a_bad_option_value_is_refused(base_cfg, tmp_path):
    assert "split" in _refused(tmp_path, _mini_tasks(base_cfg, {"split": "validation"}))
    c = copy.deepcopy(base_cfg)
    c["tasks"][1]["options"] = {"batch_size": 0}
    assert "batch_size" in _refused(tmp_path, c)


def test_code_running_tasks_need_the_opt_in_up_front(base_cfg, tmp_path):
    c = _mini_tasks(base_cfg)
    c["sandbox"] = {"allow_code_execution": False}
    err = _refused(tmp_path, c)
    assert "a, c run model-written code" in err and "allow_code_execution" in err  # mini_sql runs no code


def test_a_negative_seed_is_refused(base_cfg, tmp_path):
    assert "--seed must be >= 0" in _refused(tmp_path, base_cfg, "--seed", "-1")
    assert "seed" in _refused(tmp_path, {**base_cfg, "seed": -4})


def test_a_corrupt_model_file_is_named(base_cfg, tiny_family, tmp_path):
    bad = Path(shutil.copytree(tiny_family["b"], tmp_path / "bad_b"))
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"{not json!!!"  # the JSON header, as a broken download leaves it
    f.write_bytes(bytes(data))
    c = copy.deepcopy(base_cfg)
    c["models"]["experts"]["b"] = str(bad)
    err = _refused(tmp_path, c)
    assert str(f) in err and "safetensors" in err


def test_an_expert_of_another_architecture_is_refused_before_anything_is_written(base_cfg, tmp_path):
    other = make_tiny_family(tmp_path / "other", tasks=("c",), hidden=48)
    c = copy.deepcopy(base_cfg)
    c["models"]["experts"]["c"] = str(other["c"])
    err = _refused(tmp_path, c)
    assert "expert 'c'" in err and "does not match the base" in err


def test_a_good_config_passes_every_check(base_cfg):
    from cycleqd.config import parse_config
    from cycleqd.evolve.preflight import preflight

    preflight(parse_config(base_cfg))


@pytest.mark.parametrize("section,key,want", [("crossover", "sigmaa", "sigma"), ("mutation", "rat", "rate"),
                                              ("sampling", "hgih", "high")])
def test_a_typo_in_an_operator_parameter_says_did_you_mean(section, key, want, base_cfg, tmp_path):
    from cycleqd.config import ConfigError, parse_config

    c = copy.deepcopy(base_cfg)
    c["evolution"][section] = {key: 0.1}
    with pytest.raises(ConfigError, match=f"evolution.{section}.{key}: unknown setting; did you mean '{want}'"):
        parse_config(c)


def test_a_fishfarm_samples_file_naming_another_global_is_refused(base_cfg, tmp_path):
    """An OS task's samples.pkl whose pickle names any global but fishfarm's sample classes stops the run
    at preflight (exit 2, one line naming the file), and the global is never resolved or called."""
    evil = tmp_path / "configs" / "samples.pkl"
    evil.parent.mkdir()
    marker = tmp_path / "ran"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    c = copy.deepcopy(base_cfg)
    c["tasks"][0] = {"name": "a", "kind": "os_interaction", "data": str(evil.parent)}
    c["sandbox"] = {"allow_code_execution": True}
    err = _refused(tmp_path, c)
    assert str(evil) in err and "refused global os.system" in err
    assert not marker.exists()


def test_the_drivers_checks_of_a_built_mini_world_load_no_model_classes(small_world, tmp_path):
    """On Ray the driver never runs a model: its checks of a mini world already built (preflight, the
    world's recipe, the model files' headers) import no transformers model code, which takes seconds."""
    import subprocess
    import sys

    from mini_run import mini_config_data

    cfg = tmp_path / "mini.yaml"
    cfg.write_text(yaml.safe_dump(mini_config_data(small_world, "small", 6)))
    code = ("import sys; from cycleqd.config import load_config; from cycleqd.evolve.loop import _ready_models; "
            "_ready_models(load_config(sys.argv[1])); "
            "print(sorted(m for m in sys.modules if m.startswith('transformers.models')))")
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
