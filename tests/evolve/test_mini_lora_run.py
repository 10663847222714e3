"""experiments/mini_lora.yaml end to end through the CLI on the tiny mini world with LoRA experts
(PEFT adapters trained from its base; its models solve little: machinery only): SIGKILL mid-run and `cycleqd resume` lose nothing; the best
child exports as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads (and as full
weights with ``--dense``); a team of its elites runs as adapters in one engine and exports as
one base plus adapters."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mini_run import mini_config_data
from run_helpers import cli, cli_env, evolve_until_then_kill

from cycleqd.runs.store import RunStore

GENERATIONS = 8
REPO = Path(__file__).parents[2]
SKILLS = ("code", "sql", "shell")


@pytest.fixture(scope="module")
def lora_world(request: pytest.FixtureRequest) -> Path:
    """The tiny world with its LoRA experts (built once into pytest's cache, reused while its recipe holds)."""
    from cycleqd.mini.build import build_lora_experts

    return build_lora_experts(request.config.cache.mkdir("mini_tiny"), size="tiny", progress=False)


def _config(root: Path, world: Path) -> Path:
    """experiments/mini_lora.yaml as written, its models the small world's LoRA experts and 6 items per task."""
    from cycleqd.mini.build import lora_dir

    data = mini_config_data(world, "tiny", 6, REPO / "experiments" / "mini_lora.yaml")
    data["models"]["experts"] = {t: str(lora_dir(world, t)) for t in SKILLS}
    data["models"]["mini"]["experts"] = "lora"
    data["evolution"]["final_merge"] = False
    data["prepare_cache"] = str(root / "prepare")
    path = root / "mini_lora.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def lora_run(lora_world: Path, tmp_path_factory) -> dict:
    """`cycleqd evolve` SIGKILLed after 4 children, then `cycleqd resume`: the run and the log before the kill."""
    root = tmp_path_factory.mktemp("mini_lora")
    cfg, run = _config(root, lora_world), root / "run"
    evolve_until_then_kill(["evolve", "--config", str(cfg), "--run-dir", str(run), "--generations",
                            str(GENERATIONS), "--workers", "1"], run, 4, env=cli_env(), cwd=REPO, timeout=600)
    before = RunStore(run).children()
    res = subprocess.run([sys.executable, "-m", "cycleqd.cli", "-q", "resume", str(run)], capture_output=True,
                         text=True, env=cli_env(), timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    return {"run": run, "before": before, "world": lora_world}


def test_lora_run_killed_and_resumed_loses_nothing(lora_run):
    """The config's experts are PEFT adapters and 4 children run at once per worker; after SIGKILL and
    resume, children 1..8 are logged once each, the ones before the kill unchanged, all scored."""
    from cycleqd.model.adapters import expert_kind

    run, before = lora_run["run"], lora_run["before"]

    store = RunStore(run)
    assert expert_kind(store.config()) == "lora" and store.config().evolution.children_per_worker == 4
    assert 4 <= len(before) < GENERATIONS
    children = store.children()
    assert [c.generation for c in children] == list(range(1, GENERATIONS + 1))  # nothing lost, nothing twice
    assert children[:len(before)] == before
    assert all(c.ok and set(c.scores) == set(SKILLS) for c in children), [c for c in children if not c.ok]


def test_best_child_exports_as_a_peft_adapter(lora_run, tmp_path):
    """`cycleqd export --best mean` writes a PEFT adapter folder PeftModel.from_pretrained loads, its card
    says so; `--dense` writes full weights (card: transformers) with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, world = lora_run["run"], lora_run["world"]
    ad, dense = tmp_path / "adapter", tmp_path / "dense"
    for extra, out in (([], ad), (["--dense"], dense)):
        code, _, err = cli("export", str(run), "--best", "mean", "--out", str(out), *extra)
        assert code == 0, err
    assert (ad / "adapter_config.json").is_file() and (ad / "adapter_model.safetensors").is_file()
    assert not list(ad.glob("model*.safetensors"))
    card = (ad / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card
    assert "library_name: transformers" in (dense / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(str(world / "base"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(ad)).eval()
    full = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(world / "base"), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 7, 12, 30, 5, 9, 22, 14]])
    with torch.no_grad():
        got, want, zero = peft_model(ids).logits, full(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert float((want - zero).abs().max()) > 1e-3  # the child is not the base


def test_team_of_adapters_runs_in_one_engine_and_exports_base_plus_adapters(lora_run, tmp_path):
    """`cycleqd team --strategy vote`: members are served as adapters of one engine (no weight switch);
    `cycleqd export --team` writes one base plus one PEFT adapter per member and a README on vLLM multi-LoRA serving."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, world = lora_run["run"], lora_run["world"]
    code, _, err = cli("team", str(run), "--strategy", "vote", "--size", "2", "--out", str(tmp_path / "team"))
    assert code == 0, err
    record = json.loads((tmp_path / "team" / "team.json").read_text())
    assert record["cost"]["members_as"] == "adapters" and record["cost"]["switches"] == 0
    code, _, err = cli("export", str(run), "--team", str(tmp_path / "team"), "--out", str(tmp_path / "x"))
    assert code == 0, err
    out = tmp_path / "x"
    assert (out / "base" / "config.json").is_file()
    assert list((out / "base").glob("*.safetensors"))
    exported = json.loads((out / "team.json").read_text())
    readme = (out / "README.md").read_text()
    assert "--enable-lora" in readme and "LoRARequest" in readme and "library_name: peft" in readme
    for m in exported["members"]:
        folder = out / m["folder"]
        assert (folder / "adapter_config.json").is_file() and not list(folder.glob("model*.safetensors"))
        assert f"{m['genome']}=" in readme  # each adapter named in the vLLM command
    one = out / exported["members"][0]["folder"]
    base = AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(one))  # loads over the exported base
    assert Path(world).is_dir()
