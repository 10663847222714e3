"""The transformers engine: batched greedy generation with a resident model.

Requests are templated (chat messages through the tokenizer's own chat template,
raw prompts as they are), sorted by length, grouped by stop strings, left-padded
into batches of ``batch_size`` and decoded greedily with a KV cache. A stopping
criterion ends each row as soon as its text contains one of its stop strings, and
the output is cut there. New weights are copied into the same model in place, so
a worker evaluating many merged models never re-instantiates it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from cycleqd.config import EngineConfig
from cycleqd.engine.base import GenRequest, Weights, weight_items
from cycleqd.registry import register_engine

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Engine options passed on to ``from_pretrained`` as they are.
_MODEL_OPTIONS = ("attn_implementation", "revision", "trust_remote_code")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` = CUDA if available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class _StopOnStrings(StoppingCriteria):
    """Marks a row done once the text it generated contains a stop string.

    Only the last few tokens are decoded each step: a stop string of ``L``
    characters spans at most ``L`` tokens that each decode to some text.
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_len = prompt_len
        self.window = max((len(s) for s in self.stops), default=1) + 2

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return done
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:].tolist(), skip_special_tokens=True)
        for i, t in enumerate(tails):
            done[i] = any(s in t for s in self.stops)
        return done


@register_engine("transformers")
class HFEngine:
    """A Hugging Face causal LM with batched greedy generation.

    Args:
        model: a loaded ``AutoModelForCausalLM`` (in eval mode, on its device).
        tokenizer: its tokenizer.
        batch_size: rows per generation batch.
        max_new_tokens: optional cap on every request's ``max_new_tokens``.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 32, max_new_tokens: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        if tokenizer.pad_token_id is None:
            # Left padding needs some id; the attention mask hides it.
            tokenizer.pad_token = tokenizer.eos_token
        first = next(model.parameters())
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype

    @classmethod
    def from_path(cls, path: str, engine_cfg: EngineConfig, dtype: str | None = None) -> "HFEngine":
        """Load a model folder or Hub id.

        ``dtype`` (else ``engine_cfg.dtype``, else float32) picks the weights' dtype;
        ``engine_cfg.device`` "auto" is CUDA when available, else CPU.
        """
        device = resolve_device(engine_cfg.device)
        torch_dtype = _DTYPES[dtype or engine_cfg.dtype or "float32"]
        extra = {k: engine_cfg.options[k] for k in _MODEL_OPTIONS if k in engine_cfg.options}
        tokenizer = AutoTokenizer.from_pretrained(
            path, **{k: v for k, v in extra.items() if k in ("revision", "trust_remote_code")}
        )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra).to(device)
        return cls(model, tokenizer, batch_size=engine_cfg.batch_size, max_new_tokens=engine_cfg.max_new_tokens)

    # -- generation -------------------------------------------------------------------------
    def _encode(self, req: GenRequest) -> list[int]:
        if (req.prompt is None) == (req.messages is None):
            raise ValueError(f"request {req.sample_id!r}: set exactly one of prompt or messages")
        if req.messages is not None:
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in req.messages], tokenize=False, add_generation_prompt=True
            )
            # The chat template writes its own special tokens (BOS included).
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(req.prompt)["input_ids"]

    def _limit(self, req: GenRequest) -> int:
        n = req.max_new_tokens
        return min(n, self.max_new_tokens) if self.max_new_tokens else n

    def _eos_ids(self) -> list[int]:
        """End-of-reply tokens: the tokenizer's and the generation config's (Llama-3 lists two)."""
        ids = [self.tokenizer.eos_token_id]
        cfg_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids += cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], limits: list[int], stops: tuple[str, ...]) -> list[str]:
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        eos_ids = self._eos_ids()
        gen_cfg = GenerationConfig(
            max_new_tokens=max(limits),
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=eos_ids or None,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=gen_cfg,
            stopping_criteria=StoppingCriteriaList([_StopOnStrings(self.tokenizer, stops, width)]),
        )
        new = out[:, width:].tolist()
        texts = []
        for row, limit in zip(new, limits):
            row = row[:limit]
            cut = [row.index(e) for e in eos_ids if e in row]
            if cut:
                row = row[: min(cut)]
            texts.append(cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), stops))
        return texts

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """Greedy completions in request order, each cut at its first stop string.

        Raises:
            ValueError: a request sets both or neither of ``prompt`` and ``messages``.
        """
        encoded = [self._encode(r) for r in requests]
        outputs: list[str] = [""] * len(requests)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(tuple(r.stop), []).append(i)
        for stops, idx in groups.items():
            # Similar lengths share a batch: less padding, and short rows do not wait for long ones.
            idx.sort(key=lambda i: (len(encoded[i]), self._limit(requests[i])), reverse=True)
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k : k + self.batch_size]
                texts = self._generate_batch(
                    [encoded[i] for i in chunk], [self._limit(requests[i]) for i in chunk], stops
                )
                for i, t in zip(chunk, texts):
                    outputs[i] = t
        return outputs

    # -- scoring ----------------------------------------------------------------------------
    @torch.inference_mode()
    def sequence_logprobs(self, texts: Sequence[str], batch_size: int = 16) -> list[tuple[float, int]]:
        """``(sum of log p(token | prefix), number of scored tokens)`` of each text.

        The first token (BOS where the tokenizer adds one) is context, not scored.
        """
        out: list[tuple[float, int]] = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            logits = self.model(**enc).logits[:, :-1].float()
            target = enc["input_ids"][:, 1:]
            mask = enc["attention_mask"][:, 1:].float() * enc["attention_mask"][:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0] * mask
            out += [(float(s), int(m)) for s, m in zip(lp.sum(1), mask.sum(1))]
        return out

    # -- weights ----------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, weights: Weights) -> None:
        """Copy each ``(name, tensor)`` into the live parameter of that name, in place, as it arrives.

        Tensors are cast to the parameter's dtype and device. Tied weights (e.g.
        ``lm_head.weight`` sharing ``embed_tokens``) may be given under either name.

        Raises:
            KeyError: a name the model does not have.
            ValueError: a shape mismatch, or a parameter the weights leave out.
        """
        own = self.model.state_dict(keep_vars=True)
        covered: set[int] = set()
        for name, value in weight_items(weights):
            target = own.get(name)
            if target is None:
                raise KeyError(f"load_weights: model has no tensor {name!r}")
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"load_weights: {name} has shape {tuple(value.shape)}, model has {tuple(target.shape)}")
            target.data.copy_(value)
            covered.add(target.data_ptr())
        missing = [n for n, p in self.model.named_parameters() if p.data_ptr() not in covered]
        if missing:
            raise ValueError(f"load_weights: weights leave out parameter(s) {missing[:5]}")

    def resident_bytes(self) -> int:
        """Bytes of the model's weights (tied tensors once)."""
        seen: dict[int, int] = {}
        for t in self.model.state_dict().values():
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    def save(self, folder: str | Path, *, max_shard_size: str | int = "5GB", generation_config=None) -> None:
        """Write the model as it is now (config, safetensors shards, generation config) to ``folder``.

        ``generation_config`` (a ``GenerationConfig``) replaces the model's own when given.
        """
        if generation_config is not None:
            self.model.generation_config = generation_config
        self.model.save_pretrained(folder, max_shard_size=max_shard_size)
