"""One small registry for named operators, tasks and engines.

Duplicate names are an error; an unknown name says "did you mean ...".
Modules that define entries are imported lazily by :func:`Registry.get`, so
``import cycleqd`` stays fast and optional heavy packages are only imported when
their entry is used.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that is not in a registry (a bad-input error)."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``name``, or ``""`` if none is close.

    The one home of the suggestion every bad-name message carries (registries,
    task options, ``--tasks``, ``--archive``).
    """
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """Name -> object map with lazy modules.

    Args:
        kind: what the entries are, for error messages ("crossover", "task").
        lazy: name -> module path that registers that name when imported.
    """

    def __init__(self, kind: str, lazy: dict[str, str] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy = dict(lazy or {})

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``. Raises ValueError on duplicates."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._lazy))

    def check(self, name: str) -> None:
        """Raise UnknownNameError (with a suggestion) unless ``name`` is known. Imports nothing."""
        if name not in self._items and name not in self._lazy:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())} (known: {', '.join(self.names())})"
            )

    def get(self, name: str) -> T:
        """Return the entry, importing its module first if needed."""
        self.check(name)
        if name not in self._items:
            importlib.import_module(self._lazy[name])
        return self._items[name]


CROSSOVERS: Registry = Registry(
    "crossover", {"linear": "cycleqd.search.crossover", "layerwise": "cycleqd.search.crossover"}
)
MUTATIONS: Registry = Registry(
    "mutation", {"svd": "cycleqd.search.mutation", "gaussian": "cycleqd.search.mutation"}
)
SAMPLERS: Registry = Registry(
    "parent sampling", {"elite": "cycleqd.search.sampling", "uniform": "cycleqd.search.sampling"}
)
TASKS: Registry = Registry(
    "task",
    {
        "mbpp": "cycleqd.tasks.mbpp.task",
        "dbbench": "cycleqd.tasks.dbbench",
        "os_interaction": "cycleqd.tasks.os_interaction",
        "mini_code": "cycleqd.tasks.mini_code",
        "mini_sql": "cycleqd.tasks.mini_sql",
        "mini_shell": "cycleqd.tasks.mini_shell",
        "mini_regex": "cycleqd.tasks.mini_regex",
        "likelihood": "cycleqd.tasks.likelihood",
        "synthetic": "cycleqd.tasks.synthetic",
    },
)
ENGINES: Registry = Registry(
    "engine",
    {
        "transformers": "cycleqd.engine.hf",
        "replay": "cycleqd.engine.answers",
        "vllm": "cycleqd.engine.vllm",
    },
)

def lazy_exports(package: str, **modules: str) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` of a package that re-exports its public nouns lazily.

    ``modules`` maps a module of the package to the names it defines (space-separated); a
    module is imported on first use of one of its names, so ``from cycleqd.search import
    Archive`` does not import torch for the package's other modules.
    """
    exports = {name: f"{package}.{module}" for module, names in modules.items() for name in names.split()}

    def getattr_(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}{did_you_mean(name, exports)}")
        return getattr(importlib.import_module(exports[name]), name)

    return getattr_, lambda: sorted(exports), sorted(exports)


register_crossover = CROSSOVERS.register
register_mutation = MUTATIONS.register
register_sampler = SAMPLERS.register
register_task = TASKS.register
register_engine = ENGINES.register
