"""Mini shell: one bash command over a few small text files, from a one-line request.

Answers are checked by behaviour: the candidate and the gold command run in the
sandbox on the same files, and their standard output must match.
"""
from __future__ import annotations

import random
from typing import Any

from cycleqd.mini.items import Family

PREFIX = "sh"
STEMS = ("notes", "log", "todo", "names", "data", "list", "words", "out", "a", "b", "pets", "jobs", "plan", "mail", "users")
# File names take an optional digit suffix ("notes.txt", "notes2.txt"): every family then has
# a few hundred distinct requests, so the val and test splits hold a real sample of each.
EXTS = ("txt", "log", "md", "csv", "json", "py", "sh", "ini", "cfg", "dat", "tsv", "yml")
FILES = tuple(f"{s}{d}.{e}" for s in STEMS for d in ("",) + tuple("123456789") for e in EXTS)
WORDS = ("apple", "pear", "plum", "fig", "kiwi", "lime", "red", "blue", "cat", "dog", "sun", "sky")


def _files(rng: random.Random) -> dict[str, str]:
    names = rng.sample(FILES, rng.randint(3, 6))
    out = {}
    for nm in names:
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(4, 9))]
        out[nm] = "\n".join(lines) + "\n"
    return out


def _fam(spec: str, command: str) -> Family:
    def fam(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        files = _files(rng)
        f, g = rng.sample(sorted(files), 2)
        n_lines = files[f].count("\n")
        word = rng.choice(files[f].split())  # a word that occurs, so grep has matches
        ext = rng.choice(sorted({nm.rsplit(".", 1)[1] for nm in files}))
        fmt = dict(f=f, g=g, w=word, k=rng.randint(2, n_lines - 1), ext=ext)
        return spec.format(**fmt), command.format(**fmt), {"files": files}

    return fam


FAMILIES: dict[str, Family] = {
    "lines": _fam("count lines in {f}", "wc -l < {f}"),
    "words": _fam("count words in {f}", "wc -w < {f}"),
    "head": _fam("first {k} lines of {f}", "head -n {k} {f}"),
    "tail": _fam("last {k} lines of {f}", "tail -n {k} {f}"),
    "line": _fam("line {k} of {f}", "sed -n '{k}p' {f}"),
    "grep": _fam("lines of {f} with {w}", "grep {w} {f}"),
    "grepc": _fam("count lines of {f} with {w}", "grep -c {w} {f}"),
    "grepv": _fam("lines of {f} without {w}", "grep -v {w} {f}"),
    "sort": _fam("sort {f}", "sort {f}"),
    "sortr": _fam("sort {f} in reverse", "sort -r {f}"),
    "uniq": _fam("unique lines of {f}", "sort -u {f}"),
    "ls": _fam("list {ext} files", "ls *.{ext}"),
    "lsc": _fam("count {ext} files", "ls *.{ext} | wc -l"),
    "upper": _fam("uppercase {f}", "tr a-z A-Z < {f}"),
    "cat": _fam("join {f} and {g}", "cat {f} {g}"),
    "first": _fam("first word of each line of {f}", "cut -d' ' -f1 {f}"),
}


def same_output(got: str, want: str) -> bool:
    """Standard outputs equal, ignoring trailing whitespace on lines and at the end."""
    norm = lambda s: "\n".join(line.rstrip() for line in s.rstrip().splitlines())  # noqa: E731
    return norm(got) == norm(want)
