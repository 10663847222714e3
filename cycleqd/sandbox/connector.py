"""What the official DBBench client shows a model: mysql-connector-python 8.0.32's C-extension cursor.

fishfarm's ``Container.execute`` reconnects, runs ``cursor.execute(sql, multi=True)``, returns
``str(cursor.fetchall())``, commits, and on any exception returns ``str(e)``; the text is
cut at 800 characters (``[TRUNCATED]`` appended). With that connector (its C extension, as
pip installs it):

- a statement without a result set (INSERT, UPDATE, DELETE, CREATE ...) gives ``[]``;
- rows are a list of tuples of Python values: ``int``, ``float`` (DOUBLE / FLOAT),
  ``Decimal`` (DECIMAL, and exact arithmetic such as ``SUM`` of integers), ``str`` (text),
  ``bytearray`` (binary strings and BIT), ``datetime.date`` / ``datetime`` / ``timedelta``,
  ``None``;
- a server error reads ``ERRNO (SQLSTATE): message``, e.g. ``1054 (42S22): Unknown column ...``;
- a reply with more than one statement: the server runs them all (until one fails), the
  first result is fetched, and the commit then fails with :data:`OUT_OF_SYNC`; the
  reconnect of the next call rolls back what no ``COMMIT`` (or implicit commit of DDL)
  made permanent.

The helpers here give those strings; :mod:`cycleqd.sandbox.shared_databases` applies them on
a MariaDB server and in the SQLite emulation.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any, Sequence

MAX_CHARS = 800
OUT_OF_SYNC = "Commands out of sync; you can't run this command now"


def cut(text: str) -> str:
    """fishfarm's cut: the first 800 characters, then ``[TRUNCATED]``."""
    return text[:MAX_CHARS] + "[TRUNCATED]" if len(text) > MAX_CHARS else text


def error_text(errno: int, sqlstate: str | None, msg: str) -> str:
    """``str()`` of the connector's error: ``1054 (42S22): msg``, or ``errno: msg`` without a state."""
    return f"{errno} ({sqlstate}): {msg}" if sqlstate else f"{errno}: {msg}"


def value(v: Any) -> Any:
    """A fetched value as the connector's C extension returns it (binary strings are bytearrays)."""
    if isinstance(v, (bytes, memoryview)):
        return bytearray(v)
    if isinstance(v, bool):
        return int(v)
    return v


def rows_text(rows: Sequence[Sequence[Any]] | None) -> str:
    """``str(cursor.fetchall())``, cut: ``[]`` for a statement without a result set."""
    if not rows:
        return "[]"
    return cut(str([tuple(value(v) for v in r) for r in rows]))


def first_statement_end(sql: str) -> int:
    """Index just past the first statement's ``;`` outside quotes and comments (``len(sql)`` when none)."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\" and c != "`":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:  # a doubled quote
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
            continue
        if sql.startswith("/*", i) and not sql.startswith(("/*!", "/*M!"), i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if c == "#" or (sql.startswith("--", i) and (i + 2 >= n or sql[i + 2].isspace())):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if c == ";":
            return i + 1
        i += 1
    return n


def split_statements(sql: str) -> list[str]:
    """The statements of a reply as the server runs them with multi-statements on.

    Empty statements (``;;``, trailing blanks) are not statements; text after a ``;`` that is
    only a comment is one (the server answers it, so the reply counts as several).
    """
    out: list[str] = []
    rest = sql
    while rest.strip(" \t\r\n;"):
        rest = rest.lstrip(" \t\r\n;")
        end = first_statement_end(rest)
        out.append(rest[:end].rstrip(";").strip())
        rest = rest[end:]
    return out


def is_decimal_text(text: str) -> bool:
    """Whether a literal would be an exact DECIMAL on MySQL (``1.5``), not a DOUBLE (``1e3``)."""
    try:
        Decimal(text)
    except Exception:
        return False
    return "e" not in text.lower()


_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a", "\\": "\\", "'": "'", '"': '"'}


def mysql_to_sqlite(sql: str) -> str:
    """MySQL's lexical rules in SQLite's terms (the emulation's view of a statement).

    String literals (``'...'`` and ``"..."``) lose MySQL's backslash escapes (``\\n`` is a
    newline; ``\\%`` and ``\\_`` keep their backslash, as MySQL keeps it for LIKE) and become
    ``'...'``; an unquoted identifier that starts with digits (``1952_British_Grand_Prix_0``)
    is quoted. Everything else is left as written.
    """
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"":
            j, text = i + 1, []
            while j < n:
                d = sql[j]
                if d == "\\" and j + 1 < n:
                    e = sql[j + 1]
                    text.append(_ESCAPES.get(e, "\\" + e if e in "%_" else e))
                    j += 2
                    continue
                if d == c:
                    if j + 1 < n and sql[j + 1] == c:
                        text.append(c)
                        j += 2
                        continue
                    break
                text.append(d)
                j += 1
            out.append("'" + "".join(text).replace("'", "''") + "'")
            i = j + 1
            continue
        if c == "`":
            j = sql.find("`", i + 1)
            j = n if j < 0 else j
            out.append(sql[i:j + 1])
            i = j + 1
            continue
        if c.isdigit() and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] in "_$.")):
            j = i
            while j < n and (sql[j].isalnum() or sql[j] in "_$"):
                j += 1
            word = sql[i:j]
            k = 0
            while k < len(word) and word[k].isdigit():
                k += 1
            rest = word[k:]
            number = (not rest or word.lower().startswith("0x") or word.lower().startswith("0b")
                      or (rest[0] in "eE" and rest[1:].isdigit()))
            out.append(word if number else f"`{word}`")
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out)
