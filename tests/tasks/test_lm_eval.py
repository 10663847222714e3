"""``kind: lm_eval``: lm-evaluation-harness tasks scored through cycleqd's engine.

The mini world's skills written as lm-eval YAMLs (experiments/lm_eval/mini) score every item as
the native mini tasks do; log-likelihoods are the model's own; overlapping evolution and final
splits are refused unless allowed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from cycleqd.config import ConfigError, EngineConfig, SandboxConfig

MINI_YAMLS = Path(__file__).resolve().parents[2] / "experiments" / "lm_eval" / "mini"
BOX = SandboxConfig(allow_code_execution=True, timeout=5, memory_mb=512)


@pytest.fixture(scope="module")
def engine(small_world):
    from cycleqd.engine.hf import HFEngine

    return HFEngine.from_path(str(small_world / "expert_shell"), EngineConfig(device="cpu", batch_size=64))


def _merge(world: Path) -> dict[str, torch.Tensor]:
    """Task arithmetic: base + 0.5 (tau_shell + tau_code), a merged model as a child's weights arrive."""
    from safetensors.torch import load_file

    base, shell, code = (load_file(str(world / d / "model.safetensors")) for d in ("base", "expert_shell", "expert_code"))
    return {k: base[k] + 0.5 * (shell[k] - base[k]) + 0.5 * (code[k] - base[k]) for k in base}


def test_mini_world_through_lm_eval_scores_items_as_the_native_tasks(small_world, engine):
    """Differential: an expert and a merge, scored on the same items through ``kind: lm_eval`` (the mini
    YAMLs, local JSON, process_results in the sandbox) and through mini_code / mini_sql / mini_shell,
    get identical per-item scores (and the merge's weights arrive through load_weights, no reload)."""
    from cycleqd.registry import TASKS
    from cycleqd.tasks.lm_eval import LmEvalTask

    n = 16
    lm = LmEvalTask("lm", data=str(MINI_YAMLS), sandbox=BOX, tasks=["mini_code", "mini_sql", "mini_shell"], n=n)
    native = {s: TASKS.get(f"mini_{s}")(name=s, sandbox=BOX, split="val", n=n, seed=0) for s in ("code", "sql", "shell")}
    seen = set()
    for weights in (None, _merge(small_world)):
        if weights is not None:
            engine.load_weights(weights)
        got = {s.id: s.score for s in lm.evaluate(engine).samples}
        for skill, task in native.items():
            want = {s.id: s.score for s in task.evaluate(engine).samples}
            assert {i: got[f"mini_{skill}/{i}"] for i in want} == want, skill
            seen |= set(want.values())
    assert seen == {0.0, 1.0}  # both outcomes occur: the comparison can fail


def _write_tasks(folder: Path, val: list[dict], test: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("val", val), ("test", test)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "pick.yaml").write_text(
        "task: pick_color\ndataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    validation: val.jsonl\n    test: test.jsonl\n"
        "output_type: multiple_choice\nvalidation_split: validation\ntest_split: test\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")
    return folder


ROWS = [{"question": f"sql: the color of car{i} is", "choices": [" red", " blue", " teal"], "label": i % 3}
        for i in range(6)]


def test_overlapping_splits_are_refused_unless_allowed(tmp_path, caplog):
    """A task whose evolution and final splits share documents is refused; allow_overlap lets it run
    with a warning that names the overlap's size; disjoint splits pass silently."""
    from cycleqd.tasks.lm_eval import LmEvalTask

    folder = _write_tasks(tmp_path / "t", ROWS[:4], ROWS[2:])  # rows 2 and 3 in both
    with pytest.raises(ConfigError, match=r"2 document\(s\) of pick_color.*allow_overlap"):
        LmEvalTask("pick", data=str(folder), tasks=["pick_color"])
    with caplog.at_level(logging.WARNING, logger="cycleqd"):
        LmEvalTask("pick", data=str(folder), tasks=["pick_color"], allow_overlap=True)
    assert "2 document(s) of pick_color appear in both" in caplog.text
    with pytest.raises(ConfigError, match=r"4 document\(s\)"):  # one split for both
        LmEvalTask("pick", data=str(folder), tasks=["pick_color"], final_split="validation")
    disjoint = _write_tasks(tmp_path / "d", ROWS[:3], ROWS[3:])
    assert LmEvalTask("pick", data=str(disjoint), tasks=["pick_color"]).overlap == {"pick_color": 0}


def test_bad_lm_eval_names_are_one_line(tmp_path):
    """An unknown lm-eval task, metric or split is a ConfigError with a suggestion."""
    from cycleqd.tasks.lm_eval import LmEvalTask

    folder = _write_tasks(tmp_path / "t", ROWS[:3], ROWS[3:])
    with pytest.raises(ConfigError, match="unknown lm-eval task 'pick_colour'; did you mean 'pick_color'"):
        LmEvalTask("pick", data=str(folder), tasks=["pick_colour"])
    with pytest.raises(ConfigError, match="no metric 'accc'; did you mean 'acc'"):
        LmEvalTask("pick", data=str(folder), tasks=["pick_color"], metric="accc")
    with pytest.raises(ConfigError, match="no split 'dev'"):
        LmEvalTask("pick", data=str(folder), tasks=["pick_color"], evolution_split="dev")


def test_multiple_choice_loglikelihoods_are_the_models_own(tmp_path, engine):
    """A multiple-choice lm-eval task over local files: each choice's log-likelihood through EngineLM equals
    the model's own log-softmax over the continuation tokens, and the per-item score is argmax == label."""
    from cycleqd.engine.lm_eval import EngineLM
    from cycleqd.tasks.lm_eval import LmEvalTask

    task = LmEvalTask("pick", data=str(_write_tasks(tmp_path / "t", ROWS[:3], ROWS[3:])), tasks=["pick_color"],
                      sandbox=BOX)
    result = task.evaluate(engine)
    insts = [i for d in task._built["pick_color"].values() for i in d]
    lm, tok, model = EngineLM(engine), engine.tokenizer, engine.model
    for inst in insts:
        ctx, cont = inst.args
        ids = tok(ctx + cont)["input_ids"]
        n_ctx = len(tok(ctx)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = sum(float(logp[p - 1, ids[p]]) for p in range(n_ctx, len(ids)))
        assert abs(inst.resps[0][0] - want) < 1e-4, (inst.args, inst.resps[0], want)
    for s in result.samples:
        doc = int(s.id.split("/")[1])
        lls = [i.resps[0][0] for i in task._built["pick_color"][doc]]
        assert s.score == float(max(range(3), key=lambda k: lls[k]) == ROWS[3 + doc]["label"])
    rolling = lm.loglikelihood_rolling([type("R", (), {"args": ("sql: total price",)})()])
    assert rolling[0] < 0


def test_example_config_plans_offline():
    """experiments/lm_eval_example.yaml (a real base, three experts, GSM8K / MBPP / ARC through lm-eval)
    is accepted by ``cycleqd plan`` with no model or dataset on disk, and a typo in its options is not."""
    from run_helpers import cli

    example = Path(__file__).resolve().parents[2] / "experiments" / "lm_eval_example.yaml"
    code, ray, err = cli("plan", "--config", str(example))
    assert code == 0 and not ray, err
    from cycleqd.config import TaskConfig, check_task_options

    with pytest.raises(ConfigError, match="unknown option 'num_fewshots'; did you mean 'num_fewshot'"):
        check_task_options(TaskConfig(name="m", kind="lm_eval", options={"tasks": ["gsm8k"], "num_fewshots": 5}))
