"""One small registry for named operators, tasks and engines.

Duplicate names are an error; an unknown name says "did you mean ...".
Modules that define entries are imported lazily by :func:`Registry.get`, so
``import cycleqd`` stays fast and optional heavy packages are only imported when
their entry is used.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Generic, Iterable, TypeVar

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

    def __init__(self, kind: str, lazy: dict[str, str] | None = None, entry_points: str | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy = dict(lazy or {})
        self.entry_points = entry_points  # also: ``module:Class`` names and this entry-point group
        self._eps: dict[str, str] | None = None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``. Raises ValueError on duplicates."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._lazy) | set(self._entry_points()))

    def _entry_points(self) -> dict[str, str]:
        """Installed packages' names in the ``entry_points`` group (name -> ``module:attr``), read once."""
        if self.entry_points is None:
            return {}
        if self._eps is None:
            from importlib.metadata import entry_points

            self._eps = {ep.name: ep.value for ep in entry_points(group=self.entry_points)}
        return self._eps

    def check(self, name: str) -> None:
        """Raise UnknownNameError (with a suggestion) unless ``name`` is known.

        A built-in name imports nothing; an import path (``module:Class``) or an entry point
        is imported here, since only importing it tells whether it exists.
        """
        if name in self._items or name in self._lazy:
            return
        if self.entry_points is not None and (":" in name or name in self._entry_points()):
            self.get(name)
            return
        extra = "; or an import path module:Class" if self.entry_points is not None else ""
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())} (known: {', '.join(self.names())}{extra})"
        )

    def get(self, name: str) -> T:
        """Return the entry, importing its module first if needed (or the object an import path names)."""
        if name not in self._items and self.entry_points is not None:
            if ":" in name:
                return load_import_path(name, self.kind)
            if name in self._entry_points() and name not in self._lazy:
                return load_import_path(self._entry_points()[name], f"{self.kind} {name!r} (entry point "
                                        f"{self.entry_points})")
        self.check(name)
        if name not in self._items:
            importlib.import_module(self._lazy[name])
        return self._items[name]


def load_import_path(path: str, what: str = "object") -> Any:
    """The object ``module.sub:Name`` names (``Name`` may be dotted: ``Outer.Inner``).

    Raises:
        UnknownNameError: a malformed path, a module that is not there (with "did you mean" over
            the importable modules), a module whose import fails, or a missing name, in one line.
    """
    module, _, attr = path.partition(":")
    if not module or not attr or not all(p.isidentifier() for p in module.split(".") + attr.split(".")):
        raise UnknownNameError(f"{what} {path!r}: an import path is module.sub:Name")
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        if missing != module and not module.startswith(missing + "."):
            raise UnknownNameError(f"{what} {path!r}: importing {module!r} failed: {type(e).__name__}: {e}") from None
        parent, _, leaf = missing.rpartition(".")
        raise UnknownNameError(f"{what} {path!r}: no module named {missing!r}"
                               f"{did_you_mean(leaf, _submodules(parent))}") from None
    except Exception as e:  # the plugin's own import failed: say so in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UnknownNameError(f"{what} {path!r}: importing {module!r} failed: {type(e).__name__}: {first}") from None
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module + "".join("." + p for p in attr.split(".")[:i])
            known = [n for n in dir(obj) if not n.startswith("_")]
            raise UnknownNameError(f"{what} {path!r}: {where!r} has no {part!r}{did_you_mean(part, known)}")
        obj = getattr(obj, part)
    return obj


def _submodules(package: str) -> list[str]:
    """Names of the modules importable at top level (``package`` empty) or inside ``package``."""
    import pkgutil

    if not package:
        return [m.name for m in pkgutil.iter_modules()]
    try:
        return [m.name for m in pkgutil.iter_modules(importlib.import_module(package).__path__)]
    except Exception:
        return []


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
        "lm_eval": "cycleqd.tasks.lm_eval",
        "synthetic": "cycleqd.tasks.synthetic",
    },
    entry_points="cycleqd.tasks",  # and import paths: kind: "my_package.skills:JsonSkill"
)
SEARCHES: Registry = Registry(
    "search",
    {
        "cycleqd": "cycleqd.search.searches",
        "cma_es": "cycleqd.search.cma_es",
        "nsga2": "cycleqd.search.nsga2",
        "random": "cycleqd.search.random_search",
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
register_search = SEARCHES.register
