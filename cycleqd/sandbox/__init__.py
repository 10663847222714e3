"""Run model-written Python and shell with time and memory limits, no network.

Every call runs in a fresh temporary working folder; nothing outside it is
writable, and a program that runs past its time is killed together with every
process it started. Batches run many small programs in *one* sandbox launch,
each in its own forked child with its own limits.

Backends (``backend=``): ``auto`` (bwrap; an error where it cannot start, never an
uncontained fallback), ``bwrap``, ``docker``; ``subprocess`` is refused (UnsafeBackend,
a ValueError) unless explicitly opted in (see :mod:`cycleqd.sandbox.backends`).

Checks that an answer cannot fake live in :mod:`cycleqd.sandbox.verdict`: the job only
gives values for the calls of an assertion; the assertion itself is judged outside.

Model-written SQL is contained in :mod:`cycleqd.sandbox.sqlite` (SQLite, in process)
and :mod:`cycleqd.sandbox.mysql` (a MySQL / MariaDB server); model-written shell
sessions of the OS task in :mod:`cycleqd.sandbox.os_env`.
"""
from __future__ import annotations

from typing import Sequence

from cycleqd.sandbox.backends import (
    Backend,
    BwrapBackend,
    DockerBackend,
    RunResult,
    SandboxUnavailable,
    SubprocessBackend,
    UnsafeBackend,
    bwrap_available,
    get_backend,
)
from cycleqd.sandbox.verdict import AssertJob, AssertVerdict, check_asserts, check_asserts_batch


class CodeExecutionNotAllowed(Exception):
    """Model-written code would run but ``sandbox.allow_code_execution`` is false (bad input)."""


def require_code_execution(sandbox_cfg: object, task: str) -> None:
    """Raise CodeExecutionNotAllowed unless the sandbox config opts in to running model code."""
    if not getattr(sandbox_cfg, "allow_code_execution", False):
        raise CodeExecutionNotAllowed(
            f"task {task!r} runs model-written code; set sandbox.allow_code_execution: true to allow it "
            "(it runs in the sandbox with time and memory limits)")


def run_python_batch(programs: Sequence[str], *, timeout: float = 5.0, memory_mb: int = 512,
                     backend: str = "auto") -> list[RunResult]:
    """Run many independent Python programs in one sandbox launch, each with its own limits.

    Returns one RunResult per program, in order. A program that fails, times out or
    runs out of memory gives a RunResult saying so; this never raises for a bad program.
    """
    jobs = [{"kind": "python", "code": p} for p in programs]
    return get_backend(backend).run_batch(jobs, timeout=timeout, memory_mb=memory_mb)


def run_python(code: str, *, timeout: float = 10.0, memory_mb: int = 1024,
               files: dict[str, str] | None = None, backend: str = "auto") -> RunResult:
    """Run one Python program (``files`` are written into its working folder first)."""
    job = {"kind": "python", "code": code, "files": dict(files or {})}
    return get_backend(backend).run_batch([job], timeout=timeout, memory_mb=memory_mb)[0]


def run_shell_batch(jobs: Sequence[tuple[dict[str, str], str]], *, timeout: float = 5.0,
                    memory_mb: int = 512, backend: str = "auto") -> list[RunResult]:
    """Run many ``(files, command)`` jobs with bash, each in a fresh folder holding ``files``."""
    specs = [{"kind": "shell", "code": cmd, "files": dict(files or {})} for files, cmd in jobs]
    return get_backend(backend).run_batch(specs, timeout=timeout, memory_mb=memory_mb)


def run_shell(command: str, *, timeout: float = 10.0, memory_mb: int = 1024,
              files: dict[str, str] | None = None, init: str | None = None,
              backend: str = "auto") -> RunResult:
    """Run one bash command; ``init`` (bash) runs first in the same folder, its output discarded."""
    job = {"kind": "shell", "code": command, "files": dict(files or {}), "init": init}
    return get_backend(backend).run_batch([job], timeout=timeout, memory_mb=memory_mb)[0]


__all__ = [
    "AssertJob",
    "AssertVerdict",
    "Backend",
    "BwrapBackend",
    "CodeExecutionNotAllowed",
    "DockerBackend",
    "RunResult",
    "SandboxUnavailable",
    "SubprocessBackend",
    "UnsafeBackend",
    "bwrap_available",
    "check_asserts",
    "check_asserts_batch",
    "get_backend",
    "require_code_execution",
    "run_python",
    "run_python_batch",
    "run_shell",
    "run_shell_batch",
]
