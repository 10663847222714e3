"""fishfarm's own copy of the OS problems: ``data/os_interaction/configs/samples.pkl``, read safely.

The official CycleQD code scores the OS problems pickled in its evaluation package
(``evaluation/fishfarm/data/os_interaction/configs/samples.pkl``): all 170 of AgentBench's
problems, each an ``OSInteractionSample`` (the conversation as the model sees it, its index,
and ``{"file", "index", "config"}`` with a ``JudgeConfig``: description, init scripts, start,
check, match and example scripts). Its descriptions are those of the file fishfarm used
(AgentBench's ``7/2023-06-07-00-13-14.json``), not today's ``7/bootstrap.json``.

A pickle can run any code it names, so this module never calls ``pickle.load`` on it:
:class:`SamplesUnpickler` resolves only fishfarm's two sample classes, to inert stand-ins
that keep their state, and refuses every other global. What comes out is plain records
(:class:`FishfarmSample`), so nothing of fishfarm is imported.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cycleqd.config import ConfigError

#: The only globals a fishfarm samples file may name.
ALLOWED = {("fishfarm.tasks.os_interaction", "OSInteractionSample"),
           ("fishfarm.tasks.os_interaction", "JudgeConfig")}
#: How fishfarm names AgentBench's problem files inside a sample (stripped here).
FILE_PREFIX = "data/os_interaction/data/"
MAX_BYTES = 64 << 20


class _StandIn:
    """An inert stand-in for a fishfarm class: it only keeps the state it is given."""

    state: dict

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{type(self).__name__} with a state that is not a dict")
        self.state = state


class _OSInteractionSample(_StandIn):
    pass


class _JudgeConfig(_StandIn):
    pass


_STAND_INS = {"OSInteractionSample": _OSInteractionSample, "JudgeConfig": _JudgeConfig}


class SamplesUnpickler(pickle.Unpickler):
    """An unpickler that resolves fishfarm's ``OSInteractionSample`` and ``JudgeConfig`` to inert
    stand-ins and refuses any other global (and persistent ids)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return _STAND_INS[name]

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id")


@dataclass(frozen=True)
class FishfarmSample:
    """One pickled OS sample as plain data.

    ``position`` is its place in the list (the official code's sample id); ``file`` and
    ``index`` name the AgentBench problem (file relative to ``data/os_interaction/data/``);
    ``conversation`` is what the model is first shown; ``config`` the judge's fields
    (``description``, ``init_script``, ``start``, ``check``, ``match``, ``example_script``,
    ``image``), scripts as ``(language, code)``.
    """

    position: int
    file: str
    index: int
    conversation: tuple[dict[str, str], ...]
    config: dict[str, Any]


def samples_file(data: str) -> Path | None:
    """fishfarm's ``samples.pkl`` when ``data`` names it, its ``configs`` folder, or fishfarm's
    ``os_interaction`` folder above that; None for anything else (AgentBench's own layout)."""
    path = Path(data)
    for candidate in (path, path / "samples.pkl", path / "configs" / "samples.pkl"):
        if candidate.name == "samples.pkl" and candidate.is_file():
            return candidate
    return None


def _plain(value: Any) -> Any:
    """Lists and tuples of scripts as tuples, dicts as dicts; a stand-in where data belongs is refused."""
    if isinstance(value, _StandIn):
        raise ValueError(f"unexpected {type(value).__name__.lstrip('_')} inside a sample's data")
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _sample(position: int, obj: Any) -> FishfarmSample:
    if not isinstance(obj, _OSInteractionSample):
        raise ValueError(f"item {position} is a {type(obj).__name__}, not an OSInteractionSample")
    state = obj.state
    where = state.get("config")
    if not isinstance(where, dict) or not isinstance(where.get("config"), _JudgeConfig):
        raise ValueError(f"item {position} has no JudgeConfig")
    config = {k: _plain(v) for k, v in where["config"].state.items()}
    if not isinstance(config.get("description"), str):
        raise ValueError(f"item {position} has no description")
    conversation = state.get("problem")
    if not isinstance(conversation, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in conversation):
        raise ValueError(f"item {position}'s conversation is not a list of chat messages")
    file = str(where.get("file", ""))
    return FishfarmSample(position=position, file=file.removeprefix(FILE_PREFIX), index=int(where.get("index", -1)),
                          conversation=tuple({"role": m["role"], "content": m["content"]} for m in conversation),
                          config=config)


@lru_cache(maxsize=8)
def _read(path: str, size: int, mtime_ns: int) -> tuple[FishfarmSample, ...]:
    raw = Path(path).read_bytes()
    try:
        items = SamplesUnpickler(io.BytesIO(raw)).load()
        if not isinstance(items, list):
            raise ValueError(f"a {type(items).__name__}, not a list of samples")
        return tuple(_sample(k, obj) for k, obj in enumerate(items))
    except Exception as e:  # anything the file makes the unpickler do is the file's fault
        raise ConfigError(f"{path}: not fishfarm's OS samples file ({type(e).__name__}: {e})") from None


def read_samples(path: str | Path) -> tuple[FishfarmSample, ...]:
    """The samples of a fishfarm ``samples.pkl``, in order, read with :class:`SamplesUnpickler`.

    Raises:
        ConfigError: one line naming the file: a global other than fishfarm's two sample
            classes, a file too large, or records that are not fishfarm's samples.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if st.st_size > MAX_BYTES:
        raise ConfigError(f"{path}: {st.st_size} bytes, more than fishfarm's samples file could be")
    return _read(str(p.resolve()), st.st_size, st.st_mtime_ns)
