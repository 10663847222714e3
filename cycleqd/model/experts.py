"""Load a base model and its expert fine-tunes, and check that they can be merged.

Models are Hugging Face folders (or Hub ids, downloaded with ``huggingface_hub``)
holding ``*.safetensors`` weights, single-file or sharded with
``model.safetensors.index.json``. Only weights and JSON files are read; no model
class is built, so loading costs one pass over the files.

Tied embeddings: a model whose config ties ``lm_head`` to the input embeddings
may store no ``lm_head.weight``. Such a model is handled by dropping a stored
``lm_head.weight`` as well (it is a copy of the embeddings), so tied models
carry the embedding only and the engine's tied head follows it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch

from cycleqd.config import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TIED_HEAD = "lm_head.weight"
# Config fields that must agree for task vectors to make sense.
_ARCH_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r} (known: {', '.join(_DTYPES)})") from None


def resolve_model_dir(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub id downloaded (weights and JSON only).

    Raises:
        ConfigError: neither a folder nor a downloadable Hub id.
    """
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.exists():
        raise ConfigError(f"model path {str(path_or_id)!r} is a file, expected a folder")
    try:
        from huggingface_hub import snapshot_download  # lazy: only for Hub ids
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ConfigError(f"model {str(path_or_id)!r} is not a folder and huggingface_hub is missing") from None
    try:
        local = snapshot_download(
            repo_id=str(path_or_id), revision=revision, allow_patterns=["*.safetensors", "*.json"]
        )
    except Exception as e:  # network, auth, unknown repo: all bad input from the user's view
        raise ConfigError(f"model {str(path_or_id)!r}: not a folder and not downloadable from the Hub ({e})") from None
    return Path(local)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder (shards in index order).

    Raises:
        ConfigError: no safetensors weights in the folder.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
        return [model_dir / f for f in files]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise ConfigError(f"{model_dir}: no *.safetensors weights (convert .bin checkpoints first)")
    return found


def model_fingerprint(path_or_id: str | os.PathLike, revision: str | None = None) -> str:
    """A cheap identity of a model's weights, without reading all of them.

    Hashes each weight file's name and size and 64 KiB at six evenly spaced offsets
    (the first is the safetensors header): a retrained model with the same shapes
    differs there. A Hub id is fingerprinted through its resolved snapshot, so a
    re-uploaded expert is told apart too.

    Raises:
        ConfigError: not a model folder or a downloadable Hub id, or no safetensors weights.
    """
    h = hashlib.sha256()
    for f in weight_files(resolve_model_dir(path_or_id, revision)):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for k in range(6):
                fh.seek(size * k // 6)
                h.update(fh.read(65536))
    return h.hexdigest()[:16]


def read_model_config(model_dir: Path) -> dict:
    """The model's ``config.json`` (empty dict if absent)."""
    f = model_dir / "config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not valid JSON ({e})") from None


def _ties_embeddings(config: Mapping) -> bool:
    # transformers' PretrainedConfig defaults to tied; Llama-style configs write the field.
    return bool(config.get("tie_word_embeddings", True))


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder holds, read from headers only (no tensor data).

    Attributes:
        source: the path or Hub id as given.
        dir: the resolved local folder.
        config: the parsed config.json.
        shapes: tensor name -> shape, after dropping a tied ``lm_head.weight``.
        files: the safetensors files.
    """

    source: str
    dir: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]
    files: tuple[Path, ...]


def _iter_headers(files: tuple[Path, ...]) -> Iterator[tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                shapes = [(name, tuple(h.get_slice(name).get_shape())) for name in h.keys()]
        except Exception as e:  # safetensors' errors do not name the file
            raise ConfigError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        yield from shapes


def inspect_model(path_or_id: str | os.PathLike, revision: str | None = None) -> ModelInfo:
    """Read a model's config and tensor shapes without loading its weights."""
    model_dir = resolve_model_dir(path_or_id, revision)
    config = read_model_config(model_dir)
    files = tuple(weight_files(model_dir))
    shapes = dict(_iter_headers(files))
    if _ties_embeddings(config):
        shapes.pop(_TIED_HEAD, None)
    return ModelInfo(source=str(path_or_id), dir=model_dir, config=config, shapes=shapes, files=files)


def check_compatible(base: ModelInfo, experts: Mapping[str, ModelInfo]) -> None:
    """Check that every expert is a fine-tune of the same architecture as ``base``.

    Same config architecture fields, same tensor names and shapes (a tied
    ``lm_head`` is not a tensor).

    Raises:
        ConfigError: the first mismatch, naming the expert and the tensor or field.
    """
    for task, info in experts.items():
        who = f"expert {task!r} ({info.source})"
        for key in _ARCH_KEYS:
            if key in base.config or key in info.config:
                if base.config.get(key) != info.config.get(key):
                    raise ConfigError(
                        f"{who} does not match the base ({base.source}): config {key} is "
                        f"{info.config.get(key)!r}, base has {base.config.get(key)!r}"
                    )
        for name, shape in base.shapes.items():
            if name not in info.shapes:
                hint = " (tied embeddings differ)" if name == _TIED_HEAD else ""
                raise ConfigError(f"{who} has no tensor {name!r}{hint}, which the base has")
            if info.shapes[name] != shape:
                raise ConfigError(
                    f"{who}: tensor {name!r} has shape {list(info.shapes[name])}, base has {list(shape)}"
                )
        for name in info.shapes:
            if name not in base.shapes:
                hint = " (tied embeddings differ)" if name == _TIED_HEAD else ""
                raise ConfigError(f"{who} has tensor {name!r}{hint}, which the base lacks")


def iter_tensors(
    info: ModelInfo, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, converted, so callers need not hold a whole model."""
    from safetensors import safe_open

    dt = torch_dtype(dtype)
    for f in info.files:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            for name in h.keys():
                if name not in info.shapes:
                    continue  # a tied lm_head copy
                yield name, h.get_tensor(name).to(device=device, dtype=dt)


def load_state_dict(
    path_or_id: str | os.PathLike | ModelInfo,
    dtype: str | torch.dtype = "float32",
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Load all weights of a model folder or Hub id as ``{name: tensor}`` in ``dtype``.

    Raises:
        ConfigError: not a folder / Hub id, or no safetensors weights.
    """
    info = path_or_id if isinstance(path_or_id, ModelInfo) else inspect_model(path_or_id, revision)
    return dict(iter_tensors(info, dtype, device))
