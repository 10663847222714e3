"""The transformers engine: batched greedy generation with a resident model.

Requests are templated (chat messages through the tokenizer's own chat template,
raw prompts as they are), sorted by length, grouped by stop strings, left-padded
into batches of ``batch_size`` and decoded greedily by a loop of our own over the
model's forward (the inputs ``generate`` would build, so the tokens are the same).
Each row leaves the batch as soon as it ends (end token, stop string, token limit),
the KV cache grows in place, and only tokens that could complete a stop string
cost a decode; the output is cut at the first stop string. New weights are copied into the same model in place, so
a worker evaluating many merged models never re-instantiates it.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from cycleqd.config import EngineConfig
from cycleqd.engine.base import GenRequest, Weights, encode_request, weight_items
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


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer in a buffer that doubles when full, instead of a ``torch.cat`` per step.

    ``update`` returns views of the filled prefix, so attention sees exactly the keys a
    concatenating cache would hold.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.length = 0
        self.buf_k = self.buf_v = None
        self.keys = self.values = key_states[..., :0, :]
        self.is_initialized = True

    def _reserve(self, like: torch.Tensor, need: int) -> None:
        if self.buf_k is not None and self.buf_k.shape[-2] >= need:
            return
        cap = max(need, 2 * (self.buf_k.shape[-2] if self.buf_k is not None else 0), 64)
        shape = (*like.shape[:-2], cap, like.shape[-1])
        k, v = like.new_empty(shape), like.new_empty(shape)
        if self.length:
            k[..., : self.length, :] = self.buf_k[..., : self.length, :]
            v[..., : self.length, :] = self.buf_v[..., : self.length, :]
        self.buf_k, self.buf_v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._reserve(key_states, end)
        self.buf_k[..., self.length : end, :] = key_states
        self.buf_v[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self.buf_k[..., :end, :], self.buf_v[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self.buf_k is not None:
            self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
            self.keys, self.values = self.buf_k[..., : self.length, :], self.buf_v[..., : self.length, :]


def _new_cache(config) -> DynamicCache:
    """A cache for one batch; plain full-attention layers grow in place (others stay as transformers makes them)."""
    cache = DynamicCache(config=config)
    cache.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class _StopCheck:
    """Says which rows' generated text now contains a stop string, decoding as little as it can.

    A stop string that appears when a token is appended overlaps the text that token adds;
    tokens whose text cannot be part of any stop string (checked once per vocabulary, in
    context and alone) therefore never need a decode. Rows with any other token are checked
    by decoding their last few tokens: a stop string of ``L`` characters spans at most
    ``L`` tokens that each decode to some text.
    """

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.window = max((len(s) for s in self.stops), default=1) + 2
        self.maybe: frozenset[int] = frozenset(self._maybe_ids()) if self.stops else frozenset()

    def _maybe_ids(self) -> list[int]:
        chars = set("".join(self.stops))
        tok = self.tokenizer
        ids = list(range(len(tok)))
        probe = tok("a", add_special_tokens=False)["input_ids"][:1]
        head = tok.decode(probe, skip_special_tokens=True)
        alone = tok.batch_decode([[i] for i in ids], skip_special_tokens=True)
        after = [t[len(head):] for t in tok.batch_decode([probe + [i] for i in ids], skip_special_tokens=True)]
        return [i for i, a, b in zip(ids, alone, after)
                if a != b or not a or "\ufffd" in a or chars & set(a)]

    def done(self, row: list[int]) -> bool:
        """Whether ``row`` (its generated tokens so far) contains a stop string."""
        if not self.stops or row[-1] not in self.maybe:
            return False
        tail = self.tokenizer.decode(row[-self.window :], skip_special_tokens=True)
        return any(s in tail for s in self.stops)


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
        self._stop_checks: dict[tuple[str, ...], _StopCheck] = {}

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
    def _limit(self, req: GenRequest) -> int:
        n = req.max_new_tokens
        return min(n, self.max_new_tokens) if self.max_new_tokens else n

    def _eos_ids(self) -> list[int]:
        """End-of-reply tokens: the tokenizer's and the generation config's (Llama-3 lists two)."""
        ids = [self.tokenizer.eos_token_id]
        cfg_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids += cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def _stop_check(self, stops: tuple[str, ...]) -> _StopCheck:
        if stops not in self._stop_checks:
            self._stop_checks[stops] = _StopCheck(self.tokenizer, stops)
        return self._stop_checks[stops]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], limits: list[int], stops: tuple[str, ...]) -> list[str]:
        """Greedy decoding of one left-padded batch, token for token what ``model.generate`` gives.

        The inputs are the ones ``generate`` builds (positions from the padding mask, the
        mask dropped when nothing is padded, logits of the last position only). A row
        leaves the batch as soon as it ends (end token, stop string, its own token limit),
        and its cache rows with it, so later steps cost only the rows still writing.
        """
        n, width = len(prompts), max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        padded = not bool(mask.all())
        position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        eos = set(self._eos_ids())
        check = self._stop_check(stops)
        mask, position = mask.to(self.device), position.to(self.device)
        cache = _new_cache(self.model.config)
        params = inspect.signature(self.model.forward).parameters
        # as in ``generate``: only the last position's logits, where the model can skip the rest
        keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask if padded else None,
                         position_ids=position, past_key_values=cache, use_cache=True, **keep)
        position = position[:, -1:]
        rows = list(range(n))  # batch slot -> request row
        generated: list[list[int]] = [[] for _ in range(n)]
        while rows:
            token = out.logits[:, -1, :].float().argmax(-1)
            going = []
            for slot, (r, t) in enumerate(zip(rows, token.tolist())):
                g = generated[r]
                g.append(t)
                if t not in eos and len(g) < limits[r] and not check.done(g):
                    going.append(slot)
            if not going:
                break
            if len(going) < len(rows):
                index = torch.tensor(going, device=self.device)
                rows = [rows[k] for k in going]
                token, mask, position = token[index], mask[index], position[index]
                cache.batch_select_indices(index)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
            position = position + 1
            out = self.model(input_ids=token[:, None], attention_mask=mask if padded else None,
                             position_ids=position, past_key_values=cache, use_cache=True, **keep)
        texts = []
        for r, g in enumerate(generated):
            g = g[: limits[r]]
            if g and g[-1] in eos:
                g = g[:-1]
            texts.append(cut_at_stop(self.tokenizer.decode(g, skip_special_tokens=True), stops))
        return texts

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """Greedy completions in request order, each cut at its first stop string.

        Raises:
            ValueError: a request sets both or neither of ``prompt`` and ``messages``.
        """
        encoded = [encode_request(self.tokenizer, r) for r in requests]
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

    @torch.inference_mode()
    def prompt_logprobs(self, requests: Sequence[GenRequest], batch_size: int = 16) -> list[tuple[float, int]]:
        """``(sum of log p(token | prefix), scored tokens)`` of each request's prompt as the engine encodes it.

        The prompt is templated exactly as :meth:`generate` would (chat template, prefill);
        its first token is context, not scored. A team's router uses it to send a request to
        the member that finds its prompt least surprising.
        """
        encoded = [encode_request(self.tokenizer, r) for r in requests]
        pad = self.tokenizer.pad_token_id
        out: list[tuple[float, int]] = []
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i : i + batch_size]
            width = max(len(e) for e in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, e in enumerate(chunk):
                ids[r, : len(e)] = torch.tensor(e, dtype=torch.long)
                mask[r, : len(e)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
            out += [(float(s), int(m)) for s, m in zip(lp.sum(1), mask[:, 1:].sum(1))]
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
