"""Optional vLLM engine: fast batched greedy generation on GPUs, with in-place weight loading.

vLLM is never required; it is imported only when this engine is used, and a clear
error says how to install it when it is missing. Weights are replaced through the
model's own ``load_weights`` inside the running engine, so the GPU memory and the
compiled graphs are kept between children.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch

from cycleqd.config import EngineConfig
from cycleqd.engine.base import GenRequest
from cycleqd.engine.hf import cut_at_stop
from cycleqd.registry import register_engine


class VLLMNotInstalled(ImportError):
    """vLLM was asked for but is not installed."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise VLLMNotInstalled(
            "engine 'vllm' needs the vllm package (pip install 'cycleqd[vllm]', CUDA machines only); "
            "use engine.name: transformers otherwise"
        ) from e
    return vllm


@register_engine("vllm")
class VLLMEngine:
    """A vLLM ``LLM`` behind the Engine protocol.

    Args:
        llm: a ``vllm.LLM``.
        max_new_tokens: optional cap on every request's ``max_new_tokens``.
    """

    def __init__(self, llm: Any, *, max_new_tokens: int | None = None):
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_path(cls, path: str, engine_cfg: EngineConfig, dtype: str | None = None) -> "VLLMEngine":
        """Start vLLM on a model folder or Hub id. ``engine_cfg.options`` go to ``vllm.LLM`` as they are.

        Raises:
            VLLMNotInstalled: vllm is not importable.
        """
        # In-place weight loading calls into the model, which needs the engine in this process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = _import_vllm()
        llm = vllm.LLM(model=path, dtype=dtype or engine_cfg.dtype or "auto", **dict(engine_cfg.options))
        return cls(llm, max_new_tokens=engine_cfg.max_new_tokens)

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """Greedy completions in request order, cut at the first stop string."""
        vllm = _import_vllm()
        prompts, params = [], []
        for r in requests:
            if (r.prompt is None) == (r.messages is None):
                raise ValueError(f"request {r.sample_id!r}: set exactly one of prompt or messages")
            if r.messages is not None:
                text = self.tokenizer.apply_chat_template(
                    [dict(m) for m in r.messages], tokenize=False, add_generation_prompt=True
                ) + r.prefill
                prompts.append({"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]})
            else:
                prompts.append({"prompt": r.prompt})
            limit = min(r.max_new_tokens, self.max_new_tokens) if self.max_new_tokens else r.max_new_tokens
            params.append(vllm.SamplingParams(temperature=0.0, max_tokens=limit, stop=list(r.stop) or None))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [cut_at_stop(o.outputs[0].text, r.stop) for o, r in zip(outs, requests)]

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load ``state`` into the running model in place (the model's own ``load_weights``)."""
        items = list(state.items())

        def _load(model: Any) -> None:
            model.load_weights(iter(items))

        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(_load)
        else:  # older vLLM: one worker in this process
            _load(self.llm.llm_engine.model_executor.driver_worker.model_runner.model)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
