"""The transformers engine: batching, stop strings, drafts, chat templates, in-place weights."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_family

from cycleqd.config import EngineConfig
from cycleqd.engine.hf import HFEngine, cut_at_stop
from cycleqd.engine.protocol import GenRequest
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


@pytest.mark.parametrize("batch_size,drafts", [(3, 16384), (64, 16384), (64, 0)])
def test_same_tokens_as_transformers_generate(tiny_family, batch_size, drafts):
    """Rows that stop early leave the batch; the others go on token for token as in ``generate``.

    With drafts on, every call after the first checks the previous call's completions (same
    model, other stops and limits) as drafts.
    """
    engine = HFEngine.from_path(str(tiny_family["b"]), EngineConfig(device="cpu", batch_size=batch_size,
                                                                      options={"draft_memory": drafts}))
    free = _reference(engine, _reqs(limits=(70,)))
    # stop strings the model does write, at different steps in different rows (one of two characters too)
    chars = sorted({c for t in free for c in t}, key=lambda c: -sum(t.count(c) for t in free))
    two = next(t[5:7] for t in free if len(t) > 7)
    for stops in [(), (chars[0],), (chars[1], "never-there"), (two,)]:
        reqs = _reqs(limits=(70, 3, 20, 66), stop=stops)  # past 64 tokens: the cache grows once
        assert engine.generate(reqs) == _reference(engine, reqs), stops
    ended = [t for t in engine.generate(_reqs(limits=(70,), stop=(chars[0],)))]
    assert len({len(t) for t in ended}) > 1  # rows did end at different steps


# prompts that share leading tokens in groups (the engine computes a shared prefix once)
SHARED = ["select a from t;", "select a from u;", "select b from t;", "select * from t;", "def f(n): return n",
          "def f(n): return 1", "def g(n):", "ls -la /tmp", "ls -la /var", "ls", "x"]


def test_drafts_of_other_models_give_the_models_own_tokens(tiny_family):
    """Each model's completions, with the last model's completions of the same prompts as drafts.

    The models disagree (so drafts are partly wrong, and rows go on after a rejected draft token),
    yet every output is what ``generate`` gives for the model that is loaded now.
    """
    engine = HFEngine.from_path(str(tiny_family["base"]), EngineConfig(device="cpu", batch_size=64))
    reqs = [GenRequest(str(i), prompt=p, max_new_tokens=(40, 9, 25)[i % 3], stop=stop)
            for stop in [(), ("e",)] for i, p in enumerate(SHARED + PROMPTS)]
    seen = []
    for name in ["a", "b", "c", "base", "b"]:
        engine.load_weights(load_file(str(tiny_family[name] / "model.safetensors")))
        got = engine.generate(reqs)
        assert got == _reference(engine, reqs), name
        seen.append(got)
    assert seen[0] != seen[1] and seen[1] == seen[4]
    assert sum(a == b for a, b in zip(seen[0], seen[1])) < len(reqs)


def test_draft_memory_is_bounded_and_can_be_off(tiny_family):
    path = str(tiny_family["a"])
    small = HFEngine.from_path(path, EngineConfig(device="cpu", options={"draft_memory": 3}))
    off = HFEngine.from_path(path, EngineConfig(device="cpu", options={"draft_memory": 0}))
    reqs = _reqs(limits=(12,))
    assert small.generate(reqs) == off.generate(reqs) == small.generate(reqs)
    assert len(small.decoder._drafts) == 3 and not off.decoder._drafts
    small.forget_drafts()
    assert not small.decoder._drafts


MINI = Path(__file__).resolve().parents[2] / ".cache" / "mini"


def _mini_models(world: Path) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Base, experts, and merges of them (weighted means of their weights), in an order where neighbours differ."""
    names = ("base", "expert_code", "expert_sql", "expert_shell")
    w = {n: load_file(str(world / n / "model.safetensors")) for n in names}
    mix = lambda parts: {k: sum(c * w[n][k] for n, c in parts.items()) for k in w["base"]}  # noqa: E731
    return [("expert_code", w["expert_code"]), ("expert_sql", w["expert_sql"]),
            ("code+sql", mix({"expert_code": 0.5, "expert_sql": 0.5})), ("base", w["base"]),
            ("all three", mix({"expert_code": 0.4, "expert_sql": 0.3, "expert_shell": 0.3})),
            ("expert_shell", w["expert_shell"])]


def _differences_from_generate(world: Path, n: int) -> list[tuple[str, str]]:
    """(model, task) pairs whose drafted generations differ from ``generate``'s on ``n`` val prompts per mini task."""
    from cycleqd.registry import TASKS

    engine = HFEngine.from_path(str(world / "base"), EngineConfig(device="cpu", batch_size=160))
    tasks = [TASKS.get(k)(name=k, split="val", n=n) for k in ("mini_code", "mini_sql", "mini_shell")]
    differ = []
    for name, weights in _mini_models(world):
        engine.load_weights(weights)  # the drafts are the model before's completions
        for t in tasks:
            if engine.generate(t.requests(t.items)) != _reference(engine, t.requests(t.items)):
                differ.append((name, t.name))
    assert len(engine.decoder._drafts) == 3 * n  # every prompt left a draft for the next model
    return differ


def test_mini_prompts_with_drafts_match_generate(tmp_path):
    """The mini tasks' prompts and char tokenizer, on the mini recipe's smallest (barely trained) models."""
    from cycleqd.mini import build_mini_world

    assert _differences_from_generate(build_mini_world(tmp_path, seed=0, size="tiny", progress=False), 20) == []


def test_small_mini_world_with_drafts_matches_generate(small_world):
    """Trained mini models that solve items (the small world's, and merges of them), each with the model before as drafts."""
    assert _differences_from_generate(small_world, 6) == []


@pytest.mark.skipif(not (MINI / "manifest.json").is_file(), reason="the default mini world is not built")
def test_default_mini_world_with_drafts_matches_generate():
    """The trained mini models (and merges of them) on val prompts, each with the model before as drafts."""
    assert _differences_from_generate(MINI, 20) == []


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


def test_overlong_prompt_gets_empty_reply_alone(tiny_family):
    """A prompt that leaves no room for a token (here 40 tokens, max_model_len 40) is answered "" as an
    OverLongPrompt, without decoding; the other requests of the same batch get their own replies."""
    from cycleqd.engine.protocol import OverLongPrompt

    hf = HFEngine.from_path(str(tiny_family["base"]), EngineConfig(device="cpu", batch_size=4,
                                                                   options={"max_model_len": 40}))
    assert hf.max_model_len == 40
    reqs = _reqs(limits=(6,))
    alone = hf.generate(reqs)
    long = [GenRequest("long", prompt="a" * 40, max_new_tokens=6), GenRequest("fits", prompt="a" * 39, max_new_tokens=6)]
    got = hf.generate([long[0], *reqs, long[1]])
    assert isinstance(got[0], OverLongPrompt) and got[0] == ""
    assert got[1:-1] == alone and not isinstance(got[1], OverLongPrompt)
    assert not isinstance(got[-1], OverLongPrompt)
    default = HFEngine.from_path(str(tiny_family["base"]), EngineConfig(device="cpu"))
    assert default.max_model_len == 256  # the model's max_position_embeddings
