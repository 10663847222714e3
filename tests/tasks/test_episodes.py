"""The multi-turn loop every chat task uses: official episodes ask for the official tokens, and a
prompt too long for the engine ends nothing but its own reply (counted, answered "")."""
from __future__ import annotations

from cycleqd.config import EngineConfig
from cycleqd.engine.hf import HFEngine
from cycleqd.engine.protocol import GenRequest
from cycleqd.tasks.dataset import run_episodes


class _Episode:
    """Two rounds of chat; records the replies it got."""

    def __init__(self, sample_id: str, text: str, protocol: str):
        self.sample_id, self.protocol = sample_id, protocol
        self.messages = [{"role": "user", "content": text}]
        self.done, self.turn, self.replies = False, 0, []

    def step(self, reply: str) -> None:
        self.replies.append(reply)
        self.messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "go on"}]
        self.turn += 1
        self.done = self.turn >= 2


class _Recorder:
    def __init__(self):
        self.requests: list[GenRequest] = []

    def generate(self, requests):
        self.requests += requests
        return ["ok"] * len(requests)


def test_official_episodes_ask_for_special_tokens():
    """Official episodes' chat requests set special_tokens (the second BOS); agentbench ones do not."""
    rec = _Recorder()
    run_episodes(rec, [_Episode("o", "hi", "official"), _Episode("a", "hi", "agentbench")], max_new_tokens=4)
    flags = {(r.sample_id, r.turn): r.special_tokens for r in rec.requests}
    assert flags == {("o", 0): True, ("o", 1): True, ("a", 0): False, ("a", 1): False}


def test_overlong_prompt_ends_only_its_own_reply(tiny_family):
    """With the transformers engine capped at 60 tokens, the episode whose prompt is too long gets "" each
    round and goes on; the short episode is answered by the model; the loop counts the two skipped prompts
    and records no error (a raising engine would have ended both episodes)."""
    engine = HFEngine.from_path(str(tiny_family["base"]), EngineConfig(device="cpu", options={"max_model_len": 60}))
    engine.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    long, short = _Episode("long", "x" * 80, "official"), _Episode("short", "hi", "official")
    overlong: dict[str, int] = {}
    errors = run_episodes(engine, [long, short], max_new_tokens=3, overlong=overlong)
    assert errors == {} and overlong == {"long": 2}
    assert long.replies == ["", ""] and long.done and short.done
    assert len(short.replies) == 2 and any(short.replies)
