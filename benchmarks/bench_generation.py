"""Batched vs one-at-a-time greedy generation with the transformers engine, same prompts, same run.

    python benchmarks/bench_generation.py   # prints a JSON object

Uses the mini world's base model when it is built (``.cache/mini/base``), else a
randomly initialised Llama of the same shape with the mini tokenizer.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from cycleqd.config import EngineConfig
from cycleqd.engine.hf import HFEngine
from cycleqd.engine.protocol import GenRequest
from cycleqd.mini.skills import SKILLS, skill_items


def _model_dir(tmp: Path) -> tuple[Path, str]:
    built = Path(".cache/mini/base")
    if (built / "config.json").is_file():
        return built, "mini base"
    from cycleqd.mini.tokenizer import make_char_tokenizer
    from cycleqd.mini.train import ModelShape, new_model

    tok = make_char_tokenizer()
    new_model(tok, ModelShape(), seed=0).save_pretrained(tmp / "m")
    tok.save_pretrained(tmp / "m")
    return tmp / "m", "random llama (mini shape)"


def _tokens(engine: HFEngine, outputs: list[str]) -> int:
    return sum(len(engine.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)


def bench_generation(n_prompts: int = 48, max_new_tokens: int = 40, batch_size: int = 64) -> dict:
    """Tokens/s of batched generation and of one prompt at a time, and their ratio.

    Both paths generate the same greedy continuations of the same mini-task prompts
    (no stop strings, so every row runs ``max_new_tokens`` unless it ends itself).
    """
    prompts = [it.prompt for s in SKILLS for it in skill_items(s, "val", n_prompts // len(SKILLS), seed=1)]
    reqs = [GenRequest(str(i), prompt=p, max_new_tokens=max_new_tokens) for i, p in enumerate(prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        path, which = _model_dir(Path(tmp))
        # no drafts: the one-at-a-time pass would check the batched pass's own completions
        engine = HFEngine.from_path(str(path), EngineConfig(device="cpu", batch_size=batch_size,
                                                            options={"draft_memory": 0}))
        engine.generate(reqs[:2])  # warm-up
        t0 = time.perf_counter()
        batched = engine.generate(reqs)
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = [engine.generate([r])[0] for r in reqs]
        t_single = time.perf_counter() - t0
    tok_b, tok_s = _tokens(engine, batched), _tokens(engine, single)
    return {
        "batched_generation_speedup": (tok_b / t_batched) / (tok_s / t_single),
        "batched_tokens_per_s": tok_b / t_batched,
        "single_tokens_per_s": tok_s / t_single,
        "generation_prompts": len(reqs),
        "generation_same_outputs": batched == single,
        "generation_model": which,
        "generation_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(bench_generation(), indent=2))
