"""lm-evaluation-harness's ``LM`` interface over a cycleqd :class:`~cycleqd.engine.protocol.Engine`.

:class:`EngineLM` answers lm-eval's three request types with the engine a worker already holds
(transformers or vLLM), so a child scored on lm-eval tasks costs no model load: its weights
arrive through ``load_weights`` as for every task.

- ``generate_until``: one :class:`~cycleqd.engine.protocol.GenRequest` per request (the context as
  a raw prompt, ``until`` as stop strings, ``max_gen_toks`` as ``max_new_tokens``), greedy, in
  one batched ``generate`` call, so the engine counts answers cut at the token limit as it does
  for every task.
- ``loglikelihood``: context and continuation are tokenized as lm-eval's transformers model does
  (the whole text, then the context; the continuation is the rest), then
  :meth:`~cycleqd.engine.protocol.Engine.continuation_logprobs` scores them in batches.
- ``loglikelihood_rolling``: lm-eval's rolling windows of at most ``max_length`` tokens, each scored
  the same way, summed per text.

Text is encoded with the tokenizer's defaults (its BOS where it adds one), exactly as a raw
prompt of a native task is, so the same prompt gives the same tokens either way.
"""
from __future__ import annotations

from typing import Any, Sequence

from lm_eval.api.model import LM

from cycleqd.engine.protocol import Engine, GenRequest

#: lm-eval's default token budget of a generation that does not set ``max_gen_toks``.
DEFAULT_MAX_GEN_TOKS = 256


class EngineLM(LM):
    """An lm-eval language model that is a cycleqd engine.

    Args:
        engine: the engine (it must have a Hugging Face ``tokenizer``).
        batch_size: pairs per scoring batch.
        max_length: the longest sequence a scoring window holds (rolling log-likelihoods).
        max_gen_toks: token budget of a generation whose request does not set one.
    """

    def __init__(self, engine: Engine, *, batch_size: int = 16, max_length: int = 2048,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        super().__init__()
        if engine.tokenizer is None:
            raise ValueError(f"engine {type(engine).__name__} has no tokenizer: it cannot answer lm-eval requests")
        self.engine, self.tok = engine, engine.tokenizer
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks

    # -- tokens -------------------------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        """The token a text with no context is scored after: BOS, else EOS."""
        return self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids as lm-eval's transformers model splits them (trailing spaces of
        the context move to the continuation; the continuation is the whole text's ids after the context's)."""
        if not context:
            return [self.prefix_token_id], list(self.tok(continuation, add_special_tokens=False)["input_ids"])
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx):]

    # -- lm-eval's three calls ----------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        pairs = [(c[-(self.max_length - len(t)):] if len(c) + len(t) > self.max_length else c, t) for c, t in pairs]
        return self.engine.continuation_logprobs(pairs, batch_size=self.batch_size)

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, r in enumerate(requests):
            ids = list(self.tok(r.args[0], add_special_tokens=False)["input_ids"])
            for w in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        scores = self.engine.continuation_logprobs(windows, batch_size=self.batch_size) if windows else []
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        reqs = []
        for k, r in enumerate(requests):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or [self.tok.decode([self.tok.eos_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            reqs.append(GenRequest(sample_id=f"lm_eval/{k}", prompt=context, stop=tuple(until),
                                   max_new_tokens=int(kwargs.get("max_gen_toks") or self.max_gen_toks)))
        return self.engine.generate(reqs) if reqs else []

    # -- chat templates -----------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tok, "name_or_path", "tokenizer")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's own chat template as text; its BOS is left out where encoding adds it again."""
        text = self.tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)
        bos = self.tok.bos_token
        if bos and text.startswith(bos) and self._encode("")[:1] == [self.tok.bos_token_id]:
            text = text[len(bos):]
        return text
