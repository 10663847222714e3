"""Drafted greedy decoding: token for token what ``model.generate`` gives, several tokens a step where it can.

Every model of a run is asked the same prompts, and a child's answers are mostly its parents'.
:class:`DraftedDecoder` keeps each prompt's last completion as a draft for the next model and
checks drafts (and guesses from the prompt) in the same forward passes that decode, keeping
only what the model's own argmax agrees with, so the output equals greedy ``generate``'s.
Rows share the forward pass of a common prompt prefix where the cache layers allow it.
"""
from __future__ import annotations

import hashlib
import inspect
from array import array
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cycleqd.recent import Recent


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


class StopCheck:
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

    def __init__(self, eos: Sequence[int], check: "StopCheck", limits: list[int]):
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




class DraftedDecoder:
    """Greedy decoding of token batches for one model, with a memory of drafts.

    Args:
        model: the causal LM (its weights may change between calls: drafts are only guesses).
        pad_id: the token id padding uses (hidden by the attention mask).
        draft_memory: how many prompts' last completions are kept as drafts (0: none).
    """

    def __init__(self, model, pad_id: int, draft_memory: int = DRAFT_MEMORY):
        self.model, self.pad_id = model, pad_id
        self.device: torch.device = next(model.parameters()).device
        # as in ``generate``: logits of the positions read only, where the model can skip the rest
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.draft_memory = draft_memory
        self._drafts: Recent[bytes, array] = Recent(draft_memory)
        self._plain_cache: bool | None = None  # whether every cache layer is a plain growing one

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
        ids = torch.full((len(heads), width), self.pad_id, dtype=torch.long)
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
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
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
    def decode(self, prompts: list[list[int]], limits: list[int], eos: Sequence[int], check: "StopCheck",
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
        live = _Live(eos, check, limits)
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
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
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

    def draft(self, prompt: list[int]) -> list[int]:
        """The last completion remembered for ``prompt`` (empty if none)."""
        found = self._drafts.get(self._key(prompt)) if self.draft_memory > 0 else None
        return found.tolist() if found is not None else []

    def remember(self, prompt: list[int], tokens: list[int]) -> None:
        """Keep ``tokens`` as the draft for ``prompt``; the oldest prompt goes when the memory is full."""
        if self.draft_memory > 0:
            self._drafts[self._key(prompt)] = array("i", tokens)

    def forget(self) -> None:
        """Drop every remembered completion (the next model decodes without drafts)."""
        self._drafts.clear()
