"""The transformers engine: batching, stop strings, chat templates, in-place weights."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import make_tiny_family
from cycleqd.config import EngineConfig
from cycleqd.engine.base import GenRequest
from cycleqd.engine.hf import HFEngine, cut_at_stop
from cycleqd.registry import ENGINES

PROMPTS = ["ab", "hello world", "x", "def f(n): return", "select * from t;", "q" * 30, "1+1=", "the cat"]


@pytest.fixture
def engine(tiny_family) -> HFEngine:
    return HFEngine.from_path(str(tiny_family["base"]), EngineConfig(device="cpu", batch_size=3))


def _reqs(limits=(8,), stop=()) -> list[GenRequest]:
    return [
        GenRequest(str(i), prompt=p, max_new_tokens=limits[i % len(limits)], stop=tuple(stop))
        for i, p in enumerate(PROMPTS)
    ]


def test_registered():
    assert ENGINES.get("transformers") is HFEngine


def test_batched_equals_one_by_one(engine):
    reqs = _reqs(limits=(4, 9, 13))
    batched = engine.generate(reqs)
    single = [engine.generate([r])[0] for r in reqs]
    assert batched == single
    assert any(len(t) > 0 for t in batched)


def test_per_request_token_limit(engine):
    reqs = _reqs(limits=(2, 11))
    outs = engine.generate(reqs)
    for r, o in zip(reqs, outs):
        n_tokens = len(engine.tokenizer(o, add_special_tokens=False)["input_ids"])
        assert n_tokens <= r.max_new_tokens
    # The short request is a prefix of what it would say with more room.
    long = engine.generate([GenRequest("0", prompt=PROMPTS[0], max_new_tokens=11)])[0]
    assert long.startswith(outs[0])


def test_stop_strings_cut_output(engine):
    free = engine.generate(_reqs(limits=(16,)))
    i, text = next((i, t) for i, t in enumerate(free) if len(t.strip()) >= 6)
    stop = text.strip()[3:5]
    req = GenRequest(str(i), prompt=PROMPTS[i], max_new_tokens=16, stop=(stop, "never-there"))
    got = engine.generate([req])[0]
    assert got == text[: text.index(stop)]
    assert stop not in got


def _reference(engine: HFEngine, reqs: list[GenRequest]) -> list[str]:
    """What ``model.generate`` gives: the whole batch left-padded, greedy, default settings, then cut."""
    tok, model = engine.tokenizer, engine.model
    enc = [tok(r.prompt)["input_ids"] for r in reqs]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, width - len(e):], mask[i, width - len(e):] = torch.tensor(e), 1
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=tok.pad_token_id,
                         max_new_tokens=max(r.max_new_tokens for r in reqs))
    texts = []
    for r, row in zip(reqs, out[:, width:].tolist()):
        row = row[: r.max_new_tokens]
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        texts.append(cut_at_stop(tok.decode(row, skip_special_tokens=True), r.stop))
    return texts


@pytest.mark.parametrize("batch_size", [3, 64])
def test_same_tokens_as_transformers_generate(tiny_family, batch_size):
    """Rows that stop early leave the batch; the others go on token for token as in ``generate``."""
    engine = HFEngine.from_path(str(tiny_family["b"]), EngineConfig(device="cpu", batch_size=batch_size))
    free = _reference(engine, _reqs(limits=(70,)))
    # stop strings the model does write, at different steps in different rows (one of two characters too)
    chars = sorted({c for t in free for c in t}, key=lambda c: -sum(t.count(c) for t in free))
    two = next(t[5:7] for t in free if len(t) > 7)
    for stops in [(), (chars[0],), (chars[1], "never-there"), (two,)]:
        reqs = _reqs(limits=(70, 3, 20, 66), stop=stops)  # past 64 tokens: the cache grows once
        assert engine.generate(reqs) == _reference(engine, reqs), stops
    ended = [t for t in engine.generate(_reqs(limits=(70,), stop=(chars[0],)))]
    assert len({len(t) for t in ended}) > 1  # rows did end at different steps


def test_cut_at_stop_earliest():
    assert cut_at_stop("abc\ndef;ghi", ["\n", ";"]) == "abc"
    assert cut_at_stop("abc", ["x"]) == "abc"
    assert cut_at_stop("abc", [""]) == "abc"


def test_chat_template_path(engine):
    engine.tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    msgs = ({"role": "user", "content": "hello"},)
    via_chat = engine.generate([GenRequest("c", messages=msgs, max_new_tokens=8)])[0]
    via_prompt = engine.generate([GenRequest("p", prompt="[hello]", max_new_tokens=8)])[0]
    assert via_chat == via_prompt
    with pytest.raises(ValueError):
        engine.generate([GenRequest("bad", prompt="x", messages=msgs)])


def test_load_weights_in_place(engine, tiny_family):
    reqs = _reqs(limits=(10,))
    before = engine.generate(reqs)
    ptrs = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    expert = load_file(str(tiny_family["a"] / "model.safetensors"))
    engine.load_weights(expert)
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == ptrs
    for n, p in engine.model.named_parameters():
        assert torch.equal(p.data, expert[n])
    after = engine.generate(reqs)
    fresh = HFEngine.from_path(str(tiny_family["a"]), EngineConfig(device="cpu", batch_size=3)).generate(reqs)
    assert after == fresh
    assert after != before


def test_load_weights_tied_embeddings(tmp_path):
    fam = make_tiny_family(tmp_path, tasks=("a",), tie_embeddings=True)
    eng = HFEngine.from_path(str(fam["base"]), EngineConfig(device="cpu"))
    state = load_file(str(fam["a"] / "model.safetensors"))
    state.pop("lm_head.weight", None)  # saved checkpoints leave the tied copy out
    eng.load_weights(state)
    assert torch.equal(eng.model.lm_head.weight, state["model.embed_tokens.weight"])


def test_load_weights_rejects_bad_state(engine):
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    with pytest.raises(KeyError):
        engine.load_weights({**state, "not.a.weight": torch.zeros(1)})
    name = "model.embed_tokens.weight"
    with pytest.raises(ValueError):
        engine.load_weights({**state, name: torch.zeros(3, 3)})
    with pytest.raises(ValueError):
        engine.load_weights({k: v for k, v in state.items() if k != "model.norm.weight"})


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_missing_is_a_clear_error(tiny_family):
    from cycleqd.engine.vllm import VLLMEngine, VLLMNotInstalled

    assert ENGINES.get("vllm") is VLLMEngine
    with pytest.raises(VLLMNotInstalled, match="vllm package"):
        VLLMEngine.from_path(str(tiny_family["base"]), EngineConfig(name="vllm"))
