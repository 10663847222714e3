"""How a reply becomes the code that is tested: the official (EvalPlus v0) sanitiser and the AST sanitiser."""
from __future__ import annotations

import ast
import re
import warnings

from cycleqd.tasks.mbpp.prompts import PREFILL


# -- the official sanitiser ---------------------------------------------------------------------
def strip_prefill(reply: str) -> str:
    """The reply without a leading opened python fence.

    A model answering the official prompt continues after the prefilled fence; a recorded
    reply that repeats it (a whole assistant turn) is the same reply.
    """
    head = reply.lstrip()
    if head.startswith(PREFILL):
        return head[len(PREFILL):]
    return reply


def cut_at_fence(reply: str) -> str:
    """The reply up to its first code fence (the official code's end of the prefilled block)."""
    at = reply.find("```")
    return reply if at == -1 else reply[:at]


def _syntax_ok(code: str) -> bool:
    try:
        _parse(code)
        return True
    except (SyntaxError, MemoryError, ValueError):
        return False


def _drop_unindented(code: str, protect: str) -> str:
    """Drop top-level lines after the entry point except defs and imports; stop at the first
    unindented docstring quote, ``if`` or ``print`` (they start example code)."""
    lines = code.splitlines()
    cut: set[int] = set()
    armed = False
    for i, line in enumerate(lines):
        if not armed and line.startswith(protect):
            armed = True
            continue
        if not line.strip() or line.startswith(("def ", "import ", "from ")):
            continue
        if not line[:1].isspace():
            cut.add(i)
        if line.rstrip().startswith(('"""', "if", "print")):
            cut.update(range(i, len(lines)))
            break
    return "\n".join(line for i, line in enumerate(lines) if i not in cut)


def _three_to_four(code: str) -> str:
    """A line indented by exactly three spaces gets a fourth (the one repair the sanitiser makes)."""
    return "".join((" " if len(line) - len(line.lstrip()) == 3 else "") + line + "\n" for line in code.splitlines())


def evalplus_v0_sanitize(code: str, entry_point: str) -> str:
    """EvalPlus's sanitiser as the official code ran it, on the code of one reply.

    Keeps what precedes the first ``def <entry_point>(`` as it is; of the entry point's
    definitions only those whose body holds ``"    return "`` (four spaces: a 2-space or
    tab-indented, one-line or return-less function is dropped); after it, top-level lines
    other than defs and imports go, and an unindented ``if`` / ``print`` / docstring quote
    ends the code; helper functions that do not parse go.
    """
    new = "\n" + code
    head = "def " + entry_point
    new = new.replace("\n```python\n", "\n```\n")
    for chunk in new.split("\n```\n"):
        if head in chunk:
            new = chunk
            break
    chunks = re.split(rf"{re.escape(head)}\s*\(", new)
    bodies = [c for c in chunks[1:] if "    return " in c.split("\ndef")[0]]
    opener = head + "("
    new = opener + opener.join(bodies) if bodies else ""
    new = _three_to_four(new)
    new = _drop_unindented(new, opener)
    new = chunks[0] + new
    parts = new.split("\ndef ")
    kept = [parts[0]] + [fn for fn in parts[1:]
                         if fn.strip().startswith((entry_point + " ", entry_point + "(")) or _syntax_ok("\ndef " + fn)]
    return "\ndef ".join(kept).strip()


def official_sanitize(reply: str, entry_point: str) -> str:
    """The code the official code tests for a reply: cut at the first fence, then :func:`evalplus_v0_sanitize`
    (which needs the entry point; without one the cut code is tested as it is)."""
    code = cut_at_fence(strip_prefill(reply)).strip()
    return evalplus_v0_sanitize(code, entry_point) if entry_point else code


# -- the AST sanitiser (evalplus / plain protocols) --------------------------------------------
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python|python3)?[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code of a completion: the longest ```python block that parses, else the raw text."""
    blocks = [b for b in _FENCE.findall(completion) if b.strip()]
    parsing = [b for b in blocks if _parses(b)]
    if parsing:
        return max(parsing, key=len)
    if blocks:
        return max(blocks, key=len)
    return completion


def _parse(code: str) -> ast.Module:
    with warnings.catch_warnings():  # model code is full of invalid escape sequences
        warnings.simplefilter("ignore")
        return ast.parse(code)


def _parses(code: str) -> bool:
    try:
        _parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
         ast.Assign, ast.AnnAssign, ast.AugAssign)


def sanitize(completion: str) -> str:
    """Code to test: imports, functions, classes and global assignments of the completion.

    Test calls, prints and ``if __name__ == "__main__"`` blocks are dropped so the
    model's own examples cannot fail (or pass) the sample; a completion cut off by
    the token limit is shortened line by line until it parses.
    """
    code = extract_code(completion).replace("\r\n", "\n")
    lines = code.split("\n")
    tree = None
    for end in range(len(lines), 0, -1):
        try:
            tree = _parse("\n".join(lines[:end]))
            lines = lines[:end]
            break
        except (SyntaxError, ValueError):
            continue
    if tree is None:
        return code  # let it fail in the sandbox with its own SyntaxError
    kept = []
    for node in tree.body:
        if isinstance(node, _KEEP) and not (isinstance(node, ast.Assign) and _calls_only_tests(node)):
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            kept.append("\n".join(lines[first - 1:node.end_lineno]))
    return "\n".join(kept)


def _calls_only_tests(node: ast.Assign) -> bool:
    """``result = f(...)`` style assignments at top level are example runs, not definitions."""
    return isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name) and \
        node.value.func.id in {"input", "print"}
