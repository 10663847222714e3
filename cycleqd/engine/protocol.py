"""What every engine does: generate text for a batch of requests, take new weights in place.

An engine owns its model's weights: the only way weights reach a model is
:meth:`Engine.load_weights`, fed tensor by tensor under Hugging Face names, so a
caller (``materialize``) never needs a second full copy of the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Mapping, NoReturn, Sequence, Union

if TYPE_CHECKING:  # torch takes over a second to import: commands that only read a run folder never need it
    import torch

    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import Genome
    from cycleqd.model.lora import ChildAdapter


@dataclass(frozen=True)
class GenRequest:
    """One generation request.

    Exactly one of ``prompt`` (a raw string, already templated) or ``messages``
    (chat messages ``[{"role": ..., "content": ...}]``, templated by the engine with
    the tokenizer's chat template) is set. ``sample_id`` and ``turn`` (0-based round
    of a multi-turn episode) let the replay engine return recorded outputs.
    ``prefill`` (chat messages only) is text the assistant turn starts with; the
    completion is what the model writes after it. ``special_tokens`` (chat messages
    only): the rendered chat text is tokenised with the tokenizer's special tokens, as
    vLLM 0.3.0's ``generate(prompts=...)`` tokenised the official code's prompts, so a
    tokenizer that adds a BOS puts a second one before the template's own.
    """

    sample_id: str = ""
    turn: int = 0
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    max_new_tokens: int = 512
    stop: tuple[str, ...] = field(default_factory=tuple)
    prefill: str = ""
    special_tokens: bool = False


class OverLongPrompt(str):
    """The reply an engine gives a request whose prompt is longer than its ``max_model_len``.

    It equals ``""``, as vLLM 0.3.0 answered such a request (it skipped it and the episode
    went on), so callers that do not look treat it as an empty reply; a caller that counts
    them tests ``isinstance(reply, OverLongPrompt)``.
    """

    def __new__(cls) -> "OverLongPrompt":
        return super().__new__(cls, "")


def default_max_model_len(model_config: Mapping) -> int:
    """The longest prompt + completion an engine takes by default: the model's
    ``max_position_embeddings``, at most 4096 (an engine option ``max_model_len`` overrides it)."""
    return min(int(model_config.get("max_position_embeddings") or 4096), 4096)

    def __post_init__(self) -> None:
        if isinstance(self.messages, list):  # a list from a task package: a tuple, as built-in tasks give
            object.__setattr__(self, "messages", tuple(self.messages))
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))


#: What :meth:`Engine.load_weights` accepts: a mapping or a stream of ``(name, tensor)`` pairs.
Weights = Union[Mapping[str, "torch.Tensor"], Iterable[tuple[str, "torch.Tensor"]]]


def weight_items(weights: Weights) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a mapping or a stream, without copying either."""
    return weights.items() if isinstance(weights, Mapping) else weights


class _TorchDefault:
    """A class attribute's default made from torch when first read; an instance's own value shadows it."""

    def __init__(self, make: Callable[[Any], Any]):
        self.make = make

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        import torch

        return self.make(torch)


class EngineUnsupported(NotImplementedError):
    """An engine was asked for a capability it does not have (e.g. log-probabilities of recorded answers)."""


class Engine:
    """A text generator that owns its model's weights and replaces them in place.

    Every capability a caller may use is declared here; an engine overrides the ones it
    has, and the others raise :class:`EngineUnsupported` naming the engine and the call,
    so no caller probes an engine with ``hasattr``.

    Attributes:
        device: where the model's weights live (a child is best built there).
        dtype: the model's weight dtype.
    """

    device: torch.device = _TorchDefault(lambda torch: torch.device("cpu"))
    dtype: torch.dtype = _TorchDefault(lambda torch: torch.float32)
    #: answers generated so far, and how many of them stopped at their ``max_new_tokens`` (engines
    #: that can tell count them in :meth:`generate` through :meth:`note_answers`)
    #: the Hugging Face tokenizer the engine encodes with (None where it has none, e.g. recorded answers)
    tokenizer: Any = None
    answers_generated: int = 0
    answers_truncated: int = 0
    counts_truncation: bool = False

    def _unsupported(self, what: str) -> NoReturn:
        raise EngineUnsupported(f"engine {type(self).__name__} cannot {what}")

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """Greedy completions, one per request, cut at the first stop string."""
        self._unsupported("generate text")

    def note_answers(self, truncated: Sequence[bool]) -> None:
        """Count answers just generated; ``truncated[i]`` is True when answer i stopped at its token limit
        (no end token, no stop string). Read by the worker as each task's truncation share."""
        self.answers_generated += len(truncated)
        self.answers_truncated += sum(bool(t) for t in truncated)

    def load_weights(self, weights: Weights) -> None:
        """Take new weights under Hugging Face names, one tensor at a time, in place.

        Each tensor is consumed (copied into the model) before the next one is
        drawn, so a producer may reuse one buffer for every tensor.
        """
        self._unsupported("load weights")

    def load_genome(self, genome: "Genome", factors: "Factors") -> None:
        """Build ``genome``'s weights from the resident ``factors`` on this engine's device, in its
        dtype, and stream them into :meth:`load_weights` (one scratch tensor: no second full copy)."""
        import torch

        from cycleqd.model.genome import iter_weights

        with torch.no_grad():
            self.load_weights(iter_weights(genome, factors, device=self.device, dtype=self.dtype))

    def sequence_logprobs(self, texts: Sequence[str], batch_size: int = 16) -> list[tuple[float, int]]:
        """(sum of token log-probabilities, token count) of each whole text (likelihood tasks)."""
        self._unsupported("score sequences")

    # -- children as adapters (LoRA experts): several models in one engine, no weight swap -----
    def load_adapter(self, name: str, adapter: "ChildAdapter") -> None:
        """Hold ``adapter`` (a child over LoRA experts, :mod:`cycleqd.model.lora`) under ``name``,
        beside the base weights, until :meth:`drop_adapter`."""
        self._unsupported("serve LoRA adapters")

    def drop_adapter(self, name: str) -> None:
        """Forget the adapter held under ``name`` (unknown names are ignored)."""
        self._unsupported("serve LoRA adapters")

    def generate_with(self, requests: Sequence[GenRequest], adapters: Sequence[str | None]) -> list[str]:
        """Greedy completions as :meth:`generate`, request i answered by the base plus adapter
        ``adapters[i]`` (None: the base alone), all in shared batches."""
        self._unsupported("serve LoRA adapters")

    def serves_adapters(self) -> bool:
        """Whether :meth:`load_adapter` and :meth:`generate_with` work on this engine as started."""
        return False

    def scoring_through(self, adapter: str) -> ContextManager["Engine"]:
        """A section in which the scoring calls (:meth:`sequence_logprobs`, :meth:`prompt_logprobs`,
        :meth:`continuation_logprobs`) read the base plus the loaded adapter ``adapter``; the caller
        holds the engine alone meanwhile.

        Raises:
            ValueError: the adapter was not loaded.
        """
        self._unsupported("score through a child adapter")

    def prompt_logprobs_with(self, requests: Sequence[GenRequest], adapter: str | None,
                             batch_size: int = 16) -> list[tuple[float, int]]:
        """:meth:`prompt_logprobs` of the base plus adapter ``adapter`` (None: the base alone)."""
        if adapter is None:
            return self.prompt_logprobs(requests, batch_size)
        with self.scoring_through(adapter):
            return self.prompt_logprobs(requests, batch_size)

    def prompt_logprobs(self, requests: Sequence[GenRequest], batch_size: int = 16) -> list[tuple[float, int]]:
        """(sum of log-probabilities, token count) of each request's prompt tokens (the NLL router)."""
        self._unsupported("score prompts")

    def continuation_logprobs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16
                              ) -> list[tuple[float, bool]]:
        """For each ``(context ids, continuation ids)``: the sum of log p(continuation token | the tokens
        before it) and whether every continuation token is the model's argmax (lm-eval's loglikelihood)."""
        self._unsupported("score continuations")

    def resident_bytes(self) -> int:
        """Bytes the engine's model holds on its device."""
        self._unsupported("report its resident bytes")

    def current_genome(self) -> "Genome":
        """The genome last loaded, itself (genome-only tasks score it; see :mod:`cycleqd.engine.genome_only`)."""
        self._unsupported("give the genome it holds (only a genome-only engine keeps it)")


def encode_request(tokenizer, req: GenRequest) -> list[int]:
    """The prompt token ids of ``req``, the same for every engine (so engines can be compared).

    Chat messages go through the tokenizer's own chat template (which writes its special
    tokens, BOS included) with the request's ``prefill`` appended, then are tokenised without
    further special tokens, or with them when the request sets ``special_tokens`` (the official
    protocol's second BOS); a raw prompt is tokenized with the tokenizer's defaults.

    Raises:
        ValueError: the request sets both or neither of ``prompt`` and ``messages``.
    """
    if (req.prompt is None) == (req.messages is None):
        raise ValueError(f"request {req.sample_id!r}: set exactly one of prompt or messages")
    if req.messages is not None:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in req.messages], tokenize=False, add_generation_prompt=True
        ) + req.prefill
        return tokenizer(text, add_special_tokens=req.special_tokens)["input_ids"]
    return tokenizer(req.prompt)["input_ids"]
