"""The transformers engine: batched greedy generation with a resident model.

Requests are templated (chat messages through the tokenizer's own chat template,
raw prompts as they are), grouped by stop strings and decoded greedily by a loop of
our own over the model's forward (the inputs ``generate`` would build, so the tokens
are the same). The engine remembers each prompt's last completion and checks it as a
draft when a model (a run's next child, a close relative) gets the same prompt: the
prompt and draft go through one forward pass, the longest prefix the model agrees
with is kept, and decoding goes on from there. That pass runs in chunks of similar
length, and prompts that share leading tokens compute them once. Rows still writing
decode together, each step also checking a few tokens guessed from the row's draft
and prompt; a row leaves the batch as soon as it ends (end token, stop string, token
limit), the KV cache grows in place, and only tokens that could complete a stop
string cost a decode. Every token is the model's own argmax after the tokens before
it, so drafts and guesses change the cost, never the output. New weights are copied
into the same model in place, so a worker evaluating many merged models never
re-instantiates it.
"""
from __future__ import annotations

import hashlib
import inspect
from array import array
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from cycleqd.config import EngineConfig
from cycleqd.engine.protocol import Engine, GenRequest, Weights, encode_request, weight_items
from cycleqd.model.experts import torch_dtype
from cycleqd.recent import Recent
from cycleqd.registry import register_engine

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


#: Prompts whose last completion the engine keeps as a draft, unless told otherwise.
DRAFT_MEMORY = 16384
# Tokens (rows x width) per chunk of the first forward pass: rows of similar length pad little,
# and a chunk's activations stay in the core's cache.
_CHUNK_TOKENS = 1024
# Prompts that share at least this many leading tokens may share them in the cache; a group costs
# about this many tokens' work more than it saves.
_SHARED_MIN = 4
_SHARED_COST = 8
# A decode step checks guessed tokens too, up to this many per row, and this many in all.
_GUESS_MAX = 8
_GUESS_BUDGET = 96


class _Guess:
    """Tokens that may come next in a row: what follows its latest few generated tokens in its draft or prompt.

    The longest suffix (3, 2, then 1 tokens) of the generated tokens that occurs in the draft
    is looked up there, at the occurrence nearest to where the row is now, and the draft's
    tokens after it are the guess; else (2 or 3 tokens) the last occurrence in the prompt,
    since answers repeat names from their question.
    """

    def __init__(self, draft: list[int], prompt: list[int]):
        self.draft = draft
        self.in_draft: dict[tuple[int, ...], list[int]] = {}
        self.in_prompt: dict[tuple[int, ...], int] = {}
        for size in (1, 2, 3):  # each n-gram with a token after it -> where that token is
            for i in range(len(draft) - size):
                self.in_draft.setdefault(tuple(draft[i : i + size]), []).append(i + size)
        for size in (2, 3):
            for i in range(len(prompt) - size):
                self.in_prompt[tuple(prompt[i : i + size])] = i + size
        self.prompt = prompt

    def __call__(self, generated: list[int], most: int) -> list[int]:
        if most <= 0:
            return []
        for size in (3, 2, 1):
            if len(generated) < size:
                continue
            tail = tuple(generated[-size:])
            hits = self.in_draft.get(tail)
            if hits:
                start = min(hits, key=lambda i: abs(i - len(generated)))
                return self.draft[start : start + most]
            if tail in self.in_prompt:
                start = self.in_prompt[tail]
                return self.prompt[start : start + most]
        return []


class _Live:
    """The generated tokens of a batch's rows, and the caches of the rows still writing, chunk by chunk."""

    def __init__(self, eos: Sequence[int], check: "_StopCheck", limits: list[int]):
        self.eos, self.check, self.limits = set(eos), check, limits
        self.generated: list[list[int]] = [[] for _ in limits]
        self.parts: list[tuple[DynamicCache, torch.Tensor]] = []

    def append(self, row: int, token: int) -> bool:
        """Add ``token`` to ``row``; whether the row has ended (end token, its token limit, a stop string)."""
        g = self.generated[row]
        g.append(token)
        return token in self.eos or len(g) >= self.limits[row] or self.check.done(g)

    def add(self, cache: DynamicCache, mask: torch.Tensor, slots: list[int]) -> None:
        """Keep the rows ``slots`` of one chunk's cache and mask."""
        if len(slots) < mask.shape[0]:
            index = torch.tensor(slots, device=mask.device)
            cache.batch_select_indices(index)
            mask = mask[index]
        self.parts.append((cache, mask))

    def joined(self) -> tuple[DynamicCache, torch.Tensor]:
        """One cache and mask for all kept rows, in the order added; shorter chunks are left-padded (hidden)."""
        if len(self.parts) == 1:
            return self.parts[0]
        width = max(m.shape[1] for _, m in self.parts)
        mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for _, m in self.parts])
        cache = self.parts[0][0]
        for i, layer in enumerate(cache.layers):
            layers = [c.layers[i] for c, _ in self.parts]
            layer.buf_k = torch.cat([torch.nn.functional.pad(x.keys, (0, 0, width - x.length, 0)) for x in layers])
            layer.buf_v = torch.cat([torch.nn.functional.pad(x.values, (0, 0, width - x.length, 0)) for x in layers])
            layer.length, layer.keys, layer.values = width, layer.buf_k, layer.buf_v
        return cache, mask


@register_engine("transformers")
class HFEngine(Engine):
    """A Hugging Face causal LM with batched greedy generation.

    Args:
        model: a loaded ``AutoModelForCausalLM`` (in eval mode, on its device).
        tokenizer: its tokenizer.
        batch_size: rows per generation batch.
        max_new_tokens: optional cap on every request's ``max_new_tokens``.
        draft_memory: how many prompts' last completions are kept as drafts for the next
            model asked the same prompt (0: none; a config sets it as ``engine.options.draft_memory``).
            They are kept by a digest of the prompt's ids, as 4-byte ids: 16,384 completions of
            512 tokens take 32 MiB.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 32, max_new_tokens: int | None = None,
                 draft_memory: int = DRAFT_MEMORY):
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
        # as in ``generate``: logits of the positions read only, where the model can skip the rest
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.draft_memory = draft_memory
        self._drafts: Recent[bytes, array] = Recent(draft_memory)
        self._encoded: Recent[str, list[int]] = Recent(max(draft_memory, 1024))
        self._plain_cache: bool | None = None  # whether every cache layer is a plain growing one

    @classmethod
    def from_path(cls, path: str, engine_cfg: EngineConfig, dtype: str | None = None) -> "HFEngine":
        """Load a model folder or Hub id.

        ``dtype`` (else ``engine_cfg.dtype``, else float32) picks the weights' dtype;
        ``engine_cfg.device`` "auto" is CUDA when available, else CPU.
        """
        device = resolve_device(engine_cfg.device)
        weights_dtype = torch_dtype(dtype or engine_cfg.dtype or "float32")
        extra = {k: engine_cfg.options[k] for k in _MODEL_OPTIONS if k in engine_cfg.options}
        tokenizer = AutoTokenizer.from_pretrained(
            path, **{k: v for k, v in extra.items() if k in ("revision", "trust_remote_code")}
        )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=weights_dtype, **extra).to(device)
        return cls(model, tokenizer, batch_size=engine_cfg.batch_size, max_new_tokens=engine_cfg.max_new_tokens,
                   draft_memory=int(engine_cfg.options.get("draft_memory", DRAFT_MEMORY)))

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

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache, keep: int):
        """Float logits ``(rows, keep, vocab)`` of the last ``keep`` positions (no mask where it hides nothing)."""
        extra = {"logits_to_keep": keep} if self._keeps_logits else {}
        out = self.model(input_ids=ids.to(self.device), attention_mask=None if bool(mask.all()) else mask,
                         position_ids=position.to(self.device), past_key_values=cache, use_cache=True, **extra)
        return out.logits[:, -keep:, :].float()

    def _shared_prefixes(self, prompts: list[list[int]]) -> list[tuple[int, list[torch.Tensor]]]:
        """Per row: how many leading prompt tokens it shares with its group, and their keys and values per layer.

        Rows sorted by prompt fall into groups (chosen for the most tokens saved) whose common
        prefix is computed once, in one pass over all groups; every row keeps at least one token
        of its own. Rows in no group get ``(0, [])``.
        """
        n = len(prompts)
        order = sorted(range(n), key=lambda r: prompts[r])
        seqs = [prompts[r] for r in order]
        # common prefix of neighbours, capped so each row keeps a token of its own
        near = []
        for x, y in zip(seqs, seqs[1:]):
            k, top = 0, min(len(x), len(y)) - 1
            while k < top and x[k] == y[k]:
                k += 1
            near.append(k)
        # best[j]: tokens saved by grouping the first j sorted rows; a group [i, j) shares min(near[i:j-1])
        best, cut = [0] * (n + 1), [0] * (n + 1)
        for j in range(1, n + 1):
            best[j], cut[j], common = best[j - 1], j - 1, 1 << 30
            for i in range(j - 2, -1, -1):
                common = min(common, near[i])
                if common < _SHARED_MIN:
                    break
                gain = best[i] + (j - i - 1) * common - _SHARED_COST
                if gain > best[j]:
                    best[j], cut[j] = gain, i
        groups, j = [], n
        while j > 0:
            i = cut[j]
            if j - i > 1:
                groups.append((order[i:j], min(near[i : j - 1])))
            j = i
        shared: list[tuple[int, list[torch.Tensor]]] = [(0, [])] * n
        if not groups:
            return shared
        heads = [prompts[rows[0]][:size] for rows, size in groups]
        width = max(len(h) for h in heads)
        ids = torch.full((len(heads), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for g, h in enumerate(heads):
            ids[g, width - len(h) :] = torch.tensor(h, dtype=torch.long)
            mask[g, width - len(h) :] = 1
        cache = _new_cache(self.model.config)
        self._forward(ids, mask.to(self.device), (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0), cache, 1)
        for g, (rows, size) in enumerate(groups):
            kv = [t[g, :, width - size :] for layer in cache.layers for t in (layer.keys, layer.values)]
            for r in rows:
                shared[r] = (size, kv)
        return shared

    def _first_pass(self, prompts, drafts, shared, rows, live: "_Live") -> list[tuple[int, int, int]]:
        """Prompts and drafts of ``rows`` in one forward pass; each row's tokens until its draft is wrong.

        Shared prompt prefixes (:meth:`_shared_prefixes`) enter the cache as they are, right-aligned;
        the rest of each prompt and its draft follow, left-padded. Returns ``(row, next token,
        its position)`` of the rows still writing; ``live`` gets their cache.
        """
        heads = [shared[r][0] for r in rows]
        full = [prompts[r][h:] + drafts[r] for r, h in zip(rows, heads)]
        front, width = max(heads), max(len(x) for x in full)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), front + width), dtype=torch.long)
        for i, (x, h) in enumerate(zip(full, heads)):
            ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
            mask[i, front + width - len(x) :] = 1
            mask[i, front - h : front] = 1
        position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, front:]
        cache = _new_cache(self.model.config)
        if front:
            some = next(shared[r][1] for r in rows if shared[r][0])
            for li, layer in enumerate(cache.layers):
                n_heads, dim = some[2 * li].shape[0], some[2 * li].shape[-1]
                k = some[2 * li].new_zeros((len(rows), n_heads, front, dim))
                v = torch.zeros_like(k)
                for i, (r, h) in enumerate(zip(rows, heads)):
                    if h:
                        k[i, :, front - h :] = shared[r][1][2 * li]
                        v[i, :, front - h :] = shared[r][1][2 * li + 1]
                layer.update(k, v)
        span = 1 + max(len(drafts[r]) for r in rows)
        mask = mask.to(self.device)
        greedy = self._forward(ids, mask, position, cache, span).argmax(-1).tolist()
        going = []
        for slot, r in enumerate(rows):
            d = drafts[r]
            # the greedy token after the prompt, then after each draft prefix
            for j, t in enumerate(greedy[slot][span - 1 - len(d) :]):
                if live.append(r, t):
                    break
                if j == len(d) or t != d[j]:
                    going.append((slot, r, t, len(prompts[r]) + j))
                    mask[slot, front + width - len(d) + j :] = 0  # the cache holds the draft's rejected rest: hidden
                    break
        if going:
            live.add(cache, mask, [g[0] for g in going])
        return [g[1:] for g in going]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], limits: list[int], stops: tuple[str, ...],
                        drafts: list[list[int]] | None = None) -> list[list[int]]:
        """Greedy decoding of one batch, token for token what ``model.generate`` gives; the generated ids per row.

        ``drafts`` (a guess of each row's tokens, possibly empty) ride along with the prompts in the
        first forward pass: the greedy token after every draft prefix is read off that pass and the
        longest prefix the model agrees with is kept. The rows go through that pass in chunks of
        similar length (little padding, activations that stay in cache); the rows still writing
        then decode together, each step also checking a few tokens guessed from the row's draft
        and prompt (:class:`_Guess`), so one step can accept several. Every token is the model's
        own argmax after the tokens before it, as in ``generate``: inputs are the ones ``generate``
        builds (positions from the padding mask, logits of the positions read only), cache
        positions of rejected guesses are masked out, and a row leaves the batch as soon as it
        ends (end token, stop string, its own token limit).
        """
        n = len(prompts)
        drafts = [list(d[: max(0, lim - 1)]) for d, lim in zip(drafts or [[]] * n, limits)]
        live = _Live(self._eos_ids(), self._stop_check(stops), limits)
        # chunks and shared prefixes only where caches can be joined (plain full-attention layers)
        if self._plain_cache is None:
            self._plain_cache = all(type(x) is _GrowingLayer for x in _new_cache(self.model.config).layers)
        plain = self._plain_cache
        shared = self._shared_prefixes(prompts) if plain else [(0, [])] * n
        order = sorted(range(n), key=lambda r: len(prompts[r]) - shared[r][0] + len(drafts[r]), reverse=True)
        nexts, k = [], 0
        while k < n:
            width = len(prompts[order[k]]) - shared[order[k]][0] + len(drafts[order[k]])
            end = min(n, k + max(1, _CHUNK_TOKENS // width)) if plain else n
            nexts += self._first_pass(prompts, drafts, shared, order[k:end], live)
            k = end
        if not nexts:
            return live.generated
        cache, mask = live.joined()
        rows = [r for r, _, _ in nexts]
        token = [t for _, t, _ in nexts]
        position = [p for _, _, p in nexts]
        guess: dict[int, _Guess] = {}
        while True:
            room = max(0, min(_GUESS_MAX, _GUESS_BUDGET // len(rows) - 1))
            guesses = []
            for r in rows:
                if room and r not in guess:
                    guess[r] = _Guess(drafts[r], prompts[r])
                guesses.append(guess[r](live.generated[r], room) if room else [])
            width = 1 + max(len(g) for g in guesses)
            ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
            block = torch.zeros_like(ids)
            for slot, (t, g) in enumerate(zip(token, guesses)):
                ids[slot, : 1 + len(g)] = torch.tensor([t, *g], dtype=torch.long)
                block[slot, : 1 + len(g)] = 1
            mask = torch.cat([mask, block.to(self.device)], dim=-1)
            at = torch.tensor(position, dtype=torch.long)[:, None] + torch.arange(width)
            greedy = self._forward(ids, mask, at, cache, width).argmax(-1).tolist()
            going = []
            for slot, (r, g) in enumerate(zip(rows, guesses)):
                for j, t in enumerate(greedy[slot][: 1 + len(g)]):
                    if live.append(r, t):
                        break
                    if j == len(g) or t != g[j]:
                        going.append(slot)
                        mask[slot, mask.shape[1] - width + 1 + j :] = 0
                        token[slot], position[slot] = t, position[slot] + 1 + j
                        break
            if not going:
                return live.generated
            if len(going) < len(rows):
                index = torch.tensor(going, device=self.device)
                rows, token = [rows[k] for k in going], [token[k] for k in going]
                position = [position[k] for k in going]
                mask = mask[index]
                cache.batch_select_indices(index)

    @staticmethod
    def _key(prompt: list[int]) -> bytes:
        # a digest, not the ids: chat prompts are long (a collision costs speed, never a token)
        return hashlib.blake2b(array("l", prompt).tobytes(), digest_size=16).digest()

    def _draft(self, prompt: list[int]) -> list[int]:
        """The last completion remembered for ``prompt`` (empty if none)."""
        found = self._drafts.get(self._key(prompt)) if self.draft_memory > 0 else None
        return found.tolist() if found is not None else []

    def _remember(self, prompt: list[int], tokens: list[int]) -> None:
        """Keep ``tokens`` as the draft for ``prompt``; the oldest prompt goes when the memory is full."""
        if self.draft_memory > 0:
            self._drafts[self._key(prompt)] = array("i", tokens)

    def _encode(self, req: GenRequest) -> list[int]:
        """:func:`encode_request`, kept for raw prompts: every model of a run is asked the same ones."""
        if req.prompt is None or req.messages is not None:
            return encode_request(self.tokenizer, req)
        ids = self._encoded.get(req.prompt)
        if ids is None:
            ids = self._encoded[req.prompt] = encode_request(self.tokenizer, req)
        return ids

    def forget_drafts(self) -> None:
        """Drop every remembered completion (the next model decodes without drafts)."""
        self._drafts.clear()

    def _text(self, tokens: list[int], limit: int, stops: tuple[str, ...]) -> str:
        g = tokens[:limit]
        if g and g[-1] in self._eos_ids():
            g = g[:-1]
        return cut_at_stop(self.tokenizer.decode(g, skip_special_tokens=True), stops)

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
                tokens = self._generate_batch(
                    [encoded[i] for i in chunk], [self._limit(requests[i]) for i in chunk], stops,
                    [self._draft(encoded[i]) for i in chunk],
                )
                for i, t in zip(chunk, tokens):
                    self._remember(encoded[i], t)
                    outputs[i] = self._text(t, self._limit(requests[i]), stops)
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
