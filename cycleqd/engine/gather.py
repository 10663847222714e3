"""Several children in one engine at once: their generation calls gathered into shared batches.

With LoRA experts a child is an adapter (:mod:`cycleqd.model.lora`), so a worker can
evaluate ``evolution.children_per_worker`` children at the same time, each in its own
thread running its tasks as usual. Each child's tasks talk to an :class:`AdapterView`
of the one engine; :class:`Gatherer` holds every view's ``generate`` call until each
child still evaluating has one waiting (or a short window has passed, when some child
is busy checking answers), then answers all of them with one ``generate_with`` call.
Multi-turn episodes gather round by round the same way. Outputs are each child's own
greedy tokens (the engines' ``generate_with`` guarantees it), so scores equal those of
the child evaluated alone.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any, Sequence

from cycleqd.config import ConfigError
from cycleqd.engine.protocol import Engine, GenRequest

if TYPE_CHECKING:
    from cycleqd.config import Config

#: Seconds a generation call waits for the other children's calls when some child is not generating.
WINDOW = 0.05


class Gatherer:
    """Gathers the generation calls of the children evaluating in one engine (see module docstring).

    Args:
        engine: an engine with ``load_adapter`` / ``drop_adapter`` / ``generate_with``.
        window: seconds to wait for children that are not generating right now.
    """

    def __init__(self, engine: Engine, window: float = WINDOW):
        self.engine = engine
        self.window = window
        self._cv = threading.Condition()
        self._active = 0
        self._queue: list[dict] = []
        self._busy = False
        self.calls = 0  # generate_with calls made (for tests and logs)
        self.widest = 0  # most children answered by one call

    def _exclusive(self, fn, *args):
        with self._cv:
            while self._busy:
                self._cv.wait()
            self._busy = True
        try:
            return fn(*args)
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        """The engine to one caller (a dense weight swap and its evaluation must not meet a batch)."""
        with self._cv:
            while self._busy:
                self._cv.wait()
            self._busy = True
        try:
            yield self.engine
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def enter(self, name: str, adapter: Any) -> "AdapterView":
        """Load ``adapter`` under ``name`` and count its child as evaluating; its view answers its tasks."""
        self._exclusive(self.engine.load_adapter, name, adapter)
        with self._cv:
            self._active += 1
        return AdapterView(self, name)

    def leave(self, name: str) -> None:
        """The child ``name`` is done: stop waiting for it, and drop its adapter."""
        with self._cv:
            self._active -= 1
            self._cv.notify_all()
        self._exclusive(self.engine.drop_adapter, name)

    def generate(self, name: str, requests: Sequence[GenRequest]) -> list[str]:
        """``requests`` answered through adapter ``name``, in one batch with the other children's calls."""
        item: dict = {"name": name, "requests": list(requests), "out": None}
        with self._cv:
            self._queue.append(item)
            self._cv.notify_all()
            deadline = time.monotonic() + self.window
            while item["out"] is None:
                ready = len(self._queue) >= self._active or time.monotonic() >= deadline
                if not self._busy and self._queue and ready:
                    batch, self._queue = self._queue, []
                    self._busy = True
                    self._cv.release()
                    try:
                        outs: Any = self._run(batch)
                    except BaseException as e:  # every child of the batch sees the engine's error
                        outs = e
                    finally:
                        self._cv.acquire()
                        self._busy = False
                    self._deliver(batch, outs)
                    self._cv.notify_all()
                else:
                    self._cv.wait(None if self._busy else max(1e-3, deadline - time.monotonic()))
        if isinstance(item["out"], BaseException):
            raise item["out"]
        return item["out"]

    def _run(self, batch: list[dict]) -> list[str]:
        reqs = [r for it in batch for r in it["requests"]]
        names = [it["name"] for it in batch for _ in it["requests"]]
        self.calls += 1
        self.widest = max(self.widest, len({it["name"] for it in batch}))
        return self.engine.generate_with(reqs, names)

    @staticmethod
    def _deliver(batch: list[dict], outs: Any) -> None:
        k = 0
        for it in batch:
            if isinstance(outs, BaseException):
                it["out"] = outs
                continue
            n = len(it["requests"])
            it["out"] = outs[k : k + n]
            k += n


class AdapterView(Engine):
    """One child's view of a shared engine: ``generate`` goes through its adapter, gathered with the others';
    the scoring calls go through it too, each with the engine held alone.

    Everything else a task reads (``tokenizer``, ``max_new_tokens`` ...) is the engine's.
    """

    def __init__(self, gatherer: Gatherer, name: str):
        self._gatherer = gatherer
        self._name = name
        self.device = gatherer.engine.device
        self.dtype = gatherer.engine.dtype

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._gatherer.engine, attr)

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        return self._gatherer.generate(self._name, requests)

    def _scored(self, call: str, *args):
        """A scoring call through this child's adapter, with the engine held alone (no batch meets it)."""
        with self._gatherer.exclusive() as engine, engine.scoring_through(self._name):
            return getattr(engine, call)(*args)

    def sequence_logprobs(self, texts: Sequence[str], batch_size: int = 16) -> list[tuple[float, int]]:
        return self._scored("sequence_logprobs", texts, batch_size)

    def prompt_logprobs(self, requests: Sequence[GenRequest], batch_size: int = 16) -> list[tuple[float, int]]:
        return self._scored("prompt_logprobs", requests, batch_size)

    def continuation_logprobs(self, pairs, batch_size: int = 16) -> list[tuple[float, bool]]:
        return self._scored("continuation_logprobs", pairs, batch_size)


def adapter_engine_config(cfg: "Config"):
    """``cfg.engine``, with vLLM's multi-LoRA options added when the experts are LoRA adapters and a
    worker evaluates several children at once (``evolution.children_per_worker``).

    Raises:
        ConfigError: several children per worker over dense experts (their weights cannot share an engine).
    """
    from cycleqd.model.adapters import expert_kind

    per = cfg.evolution.children_per_worker
    if per <= 1:
        return cfg.engine
    if expert_kind(cfg) != "lora":
        raise ConfigError(f"evolution.children_per_worker: {per} needs LoRA experts (adapter folders); "
                          "dense children swap the engine's weights one at a time")
    if cfg.engine.name != "vllm" or "enable_lora" in cfg.engine.options:
        return cfg.engine
    from cycleqd.engine.vllm import lora_options  # noqa: PLC0415 - only for a vLLM engine
    from cycleqd.model.adapters import lora_ranks, read_experts

    base, adapters = read_experts(cfg.models.base, {t: cfg.models.experts[t] for t in cfg.task_names},
                                  cfg.models.revision, load=False)
    rank = len(adapters) * max(lora_ranks(list(adapters.values())).values())
    return cfg.engine.model_copy(update={"options": {**cfg.engine.options, **lora_options(rank, per + 1)}})
