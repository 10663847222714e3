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

import contextlib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cycleqd.config import EngineConfig
from cycleqd.engine.drafted import DRAFT_MEMORY, DraftedDecoder, StopCheck
from cycleqd.engine.protocol import (
    Engine,
    GenRequest,
    OverLongPrompt,
    Weights,
    default_max_model_len,
    encode_request,
    weight_items,
)
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


def right_padded(seqs: Sequence[Sequence[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded with ``pad`` to the longest row, and their attention mask, on ``device``."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, x in enumerate(seqs):
        ids[r, : len(x)] = torch.tensor(list(x), dtype=torch.long)
        mask[r, : len(x)] = 1
    return ids.to(device), mask.to(device)


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
        max_model_len: the longest prompt + completion it takes (default: the model's
            ``max_position_embeddings``, at most 4096, as the vLLM engine); a prompt that leaves
            no room for a token is answered ``""`` (:class:`~cycleqd.engine.protocol.OverLongPrompt`), as vLLM 0.3.0 did.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 32, max_new_tokens: int | None = None,
                 draft_memory: int = DRAFT_MEMORY, max_model_len: int | None = None):
        self.model = model.eval()
        self.max_model_len = int(max_model_len or default_max_model_len(model.config.to_dict()))
        self.tokenizer = tokenizer
        self.counts_truncation = True
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        if tokenizer.pad_token_id is None:
            # Left padding needs some id; the attention mask hides it.
            tokenizer.pad_token = tokenizer.eos_token
        first = next(model.parameters())
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        self._stop_checks: dict[tuple[str, ...], StopCheck] = {}
        self.decoder = DraftedDecoder(model, tokenizer.pad_token_id, draft_memory)
        self._encoded: Recent[str, list[int]] = Recent(max(draft_memory, 1024))
        self._peft = None  # a PeftModel over self.model once a child adapter is loaded
        self._adapter_dir = None  # AdapterFolders, made with the first adapter

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
                   draft_memory=int(engine_cfg.options.get("draft_memory", DRAFT_MEMORY)),
                   max_model_len=engine_cfg.options.get("max_model_len"))

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

    def _stop_check(self, stops: tuple[str, ...]) -> StopCheck:
        if stops not in self._stop_checks:
            self._stop_checks[stops] = StopCheck(self.tokenizer, stops)
        return self._stop_checks[stops]


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
        self.decoder.forget()

    def _text(self, tokens: list[int], limit: int, stops: tuple[str, ...]) -> tuple[str, bool]:
        """The answer's text and whether it stopped at its token limit (no end token, no stop string)."""
        g = tokens[:limit]
        ended = bool(g) and g[-1] in self._eos_ids()
        if ended:
            g = g[:-1]
        text = self.tokenizer.decode(g, skip_special_tokens=True)
        cut = cut_at_stop(text, stops)
        return cut, len(tokens) >= limit and not ended and cut == text

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """Greedy completions in request order, each cut at its first stop string.

        A prompt of ``max_model_len`` tokens or more is not decoded: its reply is ``""``
        (:class:`~cycleqd.engine.protocol.OverLongPrompt`) and the other requests go on.

        Raises:
            ValueError: a request sets both or neither of ``prompt`` and ``messages``.
        """
        def decode(chunk: list[int], encoded: list[list[int]], stops: tuple[str, ...]) -> list[list[int]]:
            tokens = self.decoder.decode(
                [encoded[i] for i in chunk], [self._limit(requests[i]) for i in chunk], self._eos_ids(),
                self._stop_check(stops), [self.decoder.draft(encoded[i]) for i in chunk],
            )
            for i, t in zip(chunk, tokens):
                self.decoder.remember(encoded[i], t)
            return tokens

        return self._batched(requests, decode)

    def _batched(self, requests: Sequence[GenRequest],
                 decode: Callable[[list[int], list[list[int]], tuple[str, ...]], list[list[int]]]) -> list[str]:
        """Answers of ``requests`` in their order: over-long prompts answered ``""``, the rest by
        ``decode(chunk, encoded, stops)`` in batches of similar lengths that share their stop strings."""
        encoded = [self._encode(r) for r in requests]
        outputs: list[str] = [""] * len(requests)
        truncated = [False] * len(requests)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(requests):
            if len(encoded[i]) >= self.max_model_len:  # no room for a token, as in the vLLM engine
                outputs[i] = OverLongPrompt()
                continue
            groups.setdefault(tuple(r.stop), []).append(i)
        for stops, idx in groups.items():
            # Similar lengths share a batch: less padding, and short rows do not wait for long ones.
            idx.sort(key=lambda i: (len(encoded[i]), self._limit(requests[i])), reverse=True)
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k : k + self.batch_size]
                for i, t in zip(chunk, decode(chunk, encoded, stops)):
                    outputs[i], truncated[i] = self._text(t, self._limit(requests[i]), stops)
        self.note_answers(truncated)
        return outputs

    # -- children as adapters ----------------------------------------------------------------
    def load_adapter(self, name: str, adapter) -> None:
        """Hold a child adapter under ``name`` (PEFT LoRA layers over the live model, base weights untouched)."""
        from peft import PeftModel

        from cycleqd.engine.adapter_folders import AdapterFolders
        from cycleqd.model.lora import save_adapter

        if self._adapter_dir is None:
            self._adapter_dir = AdapterFolders(self)
        folder = save_adapter(adapter, self._adapter_dir.path(name), base_model="base")
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name).eval()
        else:
            if name in self._peft.peft_config:
                self._peft.delete_adapter(name)
            self._peft.load_adapter(str(folder), adapter_name=name)
        self._adapter_dir.remove(name)  # PEFT holds the weights now
        self._ready_peft()
        self._peft.to(self.device)
        # LoRA layers are on only inside generate_with: everything else sees the base alone.
        self._peft.base_model.disable_adapter_layers()

    def drop_adapter(self, name: str) -> None:
        """Forget the adapter ``name`` (its LoRA weights and folder)."""
        if self._peft is not None and name in self._peft.peft_config and len(self._peft.peft_config) > 1:
            self._peft.delete_adapter(name)
            self._ready_peft()
        if self._adapter_dir is not None:
            self._adapter_dir.remove(name)

    def generate_with(self, requests: Sequence[GenRequest], adapters: Sequence[str | None]) -> list[str]:
        """Greedy completions, request i through adapter ``adapters[i]`` (None: the base), rows of
        different adapters in one batch (:func:`cycleqd.engine.mixed.greedy_mixed`).

        Raises:
            ValueError: lengths differ, or an adapter was not loaded.
        """
        from cycleqd.engine.mixed import BASE, greedy_mixed

        if len(adapters) != len(requests):
            raise ValueError(f"generate_with: {len(requests)} requests, {len(adapters)} adapter names")
        if all(a is None for a in adapters):
            return self.generate(requests)
        known = set(self._peft.peft_config) if self._peft is not None else set()
        unknown = sorted({a for a in adapters if a is not None and a not in known})
        if unknown:
            raise ValueError(f"generate_with: adapter(s) {unknown} not loaded")
        def decode(chunk: list[int], encoded: list[list[int]], stops: tuple[str, ...]) -> list[list[int]]:
            return self._mixed(greedy_mixed, [encoded[i] for i in chunk], [self._limit(requests[i]) for i in chunk],
                               self._eos_ids(), self._stop_check(stops), [adapters[i] or BASE for i in chunk],
                               self.tokenizer.pad_token_id)

        return self._batched(requests, decode)

    def serves_adapters(self) -> bool:
        """True: PEFT's mixed-adapter batches serve any number of child adapters."""
        return True

    @contextlib.contextmanager
    def scoring_through(self, adapter: str):
        """The LoRA layers of ``adapter`` on for the scoring calls inside (see :class:`Engine`)."""
        if self._peft is None or adapter not in self._peft.peft_config:
            raise ValueError(f"scoring through adapter {adapter!r}: not loaded")
        self._peft.base_model.set_adapter(adapter)
        self._peft.base_model.enable_adapter_layers()
        try:
            yield self
        finally:
            self._peft.base_model.disable_adapter_layers()

    def _ready_peft(self) -> None:
        """Make PEFT's model-level active adapter one that is loaded. PEFT reads its config on every
        forward (``active_peft_config``), and after deletions and reloads it can still name a deleted
        adapter; the rows' own adapters are chosen per call (``adapter_names``) regardless."""
        loaded = list(self._peft.peft_config)
        if loaded and self._peft.active_adapter not in loaded:
            self._peft.base_model.set_adapter(loaded[-1])

    def _mixed(self, decode, *args):
        self._ready_peft()
        self._peft.base_model.enable_adapter_layers()
        try:
            return decode(self._peft, *args)
        finally:
            self._peft.base_model.disable_adapter_layers()

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
    def continuation_logprobs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16
                              ) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation token | prefix), all continuation tokens greedy)`` of each pair.

        Context and continuation run as one right-padded sequence; the context needs at least one token.
        """
        pad = self.tokenizer.pad_token_id
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: dict[int, tuple[float, bool]] = {}
        for k in range(0, len(order), batch_size):
            chunk = order[k : k + batch_size]
            ids, mask = right_padded([list(pairs[i][0]) + list(pairs[i][1]) for i in chunk], pad, self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits, -1)
            for r, i in enumerate(chunk):
                ctx, cont = pairs[i]
                if not ctx:
                    raise ValueError("continuation_logprobs: a context needs at least one token")
                rows = logp[r, len(ctx) - 1 : len(ctx) + len(cont) - 1]
                target = torch.tensor(list(cont), dtype=torch.long, device=rows.device)
                total = float(rows.gather(-1, target[:, None]).sum())
                results[i] = (total, bool((rows.argmax(-1) == target).all()))
        return [results[i] for i in range(len(pairs))]

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
            ids, mask = right_padded(chunk, pad, self.device)
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
            if target is None and self._peft is not None:  # a module PEFT wrapped keeps its weight in base_layer
                mod, _, leaf = name.rpartition(".")
                target = own.get(f"{mod}.base_layer.{leaf}")
            if target is None:
                raise KeyError(f"load_weights: model has no tensor {name!r}")
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"load_weights: {name} has shape {tuple(value.shape)}, model has {tuple(target.shape)}")
            target.data.copy_(value)
            covered.add(target.data_ptr())
        missing = [n for n, p in self.model.named_parameters() if p.data_ptr() not in covered and ".lora_" not in n]
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
