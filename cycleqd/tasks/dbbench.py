"""AgentBench DBBench: answer questions about (or modify) a table with SQL, over up to 5 rounds.

Follows the AgentBench protocol (``src/server/tasks/dbbench``):

- every column is TEXT; the table is created and filled per sample;
- the conversation is the instruction prompt, an agent ``Ok.``, then the question
  with the table description;
- ``Action: Operation`` + a ```sql block runs the statement (newlines turned into
  spaces); the raw result (``str`` of the fetched rows, or the error text, cut at
  800 characters) is the next user turn; up to ``max_rounds`` operations;
- ``Action: Answer`` + ``Final Answer: [...]`` ends the episode;
- SELECT-type questions compare the answer list with the label (one value: as
  floats if both parse, else as strings; several: as sets); INSERT / UPDATE /
  DELETE compare a hash of the table afterwards with ``answer_md5``:
  ``md5(group_concat(rowhash ORDER BY rowhash))`` over ``rowhash =
  left(md5(concat_ws(',', columns)), 5)``.

``protocol`` picks where the official CycleQD code (fishfarm) and AgentBench differ:

- ``official`` (default): up to ``max_rounds`` operations, then one more reply that must
  answer; an ``Operation`` reply without a ```sql block still has its ``Final Answer``
  read; row ``standard:4`` carries the official copy's label. The databases are fishfarm's:
  one per table name, made up front for every chosen row, dropped when a row using it
  finishes, replies acted on in row order (:mod:`cycleqd.sandbox.shared_databases`); the
  observations are what mysql-connector-python 8.0.32 showed (``[]`` without a result set,
  its value reprs and error texts, several statements: "Commands out of sync ...";
  :mod:`cycleqd.sandbox.connector`).
- ``agentbench``: ``max_rounds`` replies in all (an operation in the last one ends the
  episode unanswered); an ``Operation`` reply without a ```sql block fails the sample.
  Each row has its own database, dropped when its episode is scored.

Answers are read like ``list(eval(answer))`` in both harnesses, but safely
(:func:`parse_answer`: literals and arithmetic only). ``data`` may be a JSONL file,
AgentBench's ``data/dbbench`` folder (``standard.jsonl`` then ``dev.jsonl``; sample ids
are 0-based indexes into that concatenation), or fishfarm's own copy
(``evaluation/fishfarm/data/db/data_dbbench_standard_dev.jsonl``, its folder or the ``data``
folder above: the same 360 rows in the same order, as the official code scored them);
``select: official`` keeps the rows the official code scores (shipped in
:mod:`cycleqd.tasks.official`).

Backends: ``sqlite`` (in process, the default; emulates the MySQL behaviour the
scoring depends on: the table hash with MySQL's 1024-byte ``group_concat``
limit, case-insensitive text comparison, MySQL-style result rows) and ``mysql``
(one throw-away database and user per sample on a MariaDB server: cycleqd's own,
started once per task object with :meth:`cycleqd.sandbox.mariadb.MariaDBServer.start`,
or the server at ``url``, which is checked at start-up and warned about where it lacks
the hostile-tenant set-up; under ``official`` no other evaluation may use it at the same
time, since the databases carry the tables' own names).
Model SQL runs contained on both (:mod:`cycleqd.sandbox.sqlite`, :mod:`cycleqd.sandbox.mysql`).
"""
from __future__ import annotations

import ast
import logging
import operator
import re
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

from pydantic import BaseModel, Field

from cycleqd.bounded import parse_python
from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.protocol import Engine
from cycleqd.registry import register_task
from cycleqd.sandbox.databases import Database, MySQLDatabase, SQLiteDatabase, parse_mysql_url
from cycleqd.sandbox.mariadb import MariaDBServer, ServerUnavailable
from cycleqd.sandbox.shared_databases import MariaDBShared, SharedDatabase, SQLiteShared
from cycleqd.tasks.dataset import DatasetOptions, DatasetTask, read_rows, run_episodes, select_ids, task_result
from cycleqd.tasks.official import official_samples
from cycleqd.tasks.protocol import SampleResult, TaskResult

PROMPT = """
I will ask you a question, then you should help me operate a MySQL database with SQL to answer the question.
You have to explain the problem and your solution to me and write down your thoughts.
After thinking and explaining thoroughly, every round you can choose to operate or to answer.
your operation should be like this:
Action: Operation
```sql
SELECT * FROM table WHERE condition;
```
You MUST put SQL in markdown format without any other comments. Your SQL should be in one line.
Every time you can only execute one SQL statement. I will only execute the statement in the first SQL code block. Every time you write a SQL, I will execute it for you and give you the output.
If you are done operating, and you want to commit your final answer, then write down:
Action: Answer
Final Answer: ["ANSWER1", "ANSWER2", ...]
DO NOT write this pattern unless you are sure about your answer. I expect an accurate and correct answer.
Your answer should be accurate. Your answer must be exactly the same as the correct answer.
If the question is about modifying the database, then after done operation, your answer field can be anything.
If your response cannot match any pattern I mentioned earlier, you will be judged as FAIL immediately.
Your input will be raw MySQL response, you have to deal with it by yourself.
"""

MUTATING = ("INSERT", "DELETE", "UPDATE")
SPLITS = ("standard", "dev")  # AgentBench data/dbbench, in the order the official ids count them
# Labels the official copy of the data carries where AgentBench's file differs: (split, index) -> (AgentBench, official)
OFFICIAL_LABELS = {("standard", 4): (["Vienna"], ["Vienna International Airport"])}

log = logging.getLogger(__name__)
_ACTION = re.compile(r"Action: (.*?)\n")
_SQL = re.compile(r"```sql\n([\s\S]*?)\n```")
_ANSWER = re.compile(r"\nFinal Answer:(.*)")
class DBEpisode:
    """One DBBench sample played out round by round (see module docstring)."""

    def __init__(self, sample_id: str, row: dict, db: Database, max_rounds: int, protocol: str = "official"):
        self.sample_id, self.row, self.db, self.max_rounds = sample_id, row, db, max_rounds
        self.protocol = protocol
        self.messages = [
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": row.get("description", "") + "\n" + row.get("add_description", "")},
        ]
        self.turn = 0
        self.rounds = 0
        self.done = False
        self.answer = ""
        self.status = "running"
        #: called once when a step ends the episode (scores it and drops its database early)
        self.on_done: Callable[["DBEpisode"], None] | None = None

    def step(self, reply: str) -> None:
        try:
            self._step(reply)
        finally:
            if self.done and self.on_done is not None:
                finish, self.on_done = self.on_done, None
                finish(self)

    def _step(self, reply: str) -> None:
        reply = reply or ""
        self.messages.append({"role": "assistant", "content": reply})
        self.turn += 1
        action = _ACTION.search(reply)
        if action and action.group(1) == "Operation" and self.rounds < self.max_rounds:
            m = _SQL.search(reply)
            if m:
                result = self.db.execute(m.group(1).strip().replace("\n", " "))
                self.messages.append({"role": "user", "content": result or ""})
                self.rounds += 1
                if self.protocol == "agentbench" and self.turn >= self.max_rounds:
                    self.status, self.done = "round limit", True
                return
            if self.protocol == "agentbench":
                self.status, self.done = "invalid action: no ```sql block", True
                return
            # the official code falls through and reads the reply's final answer
        m = _ANSWER.search(reply)
        self.answer = m.group(1) if m else ""
        self.status = "answered" if m else ("round limit" if self.rounds >= self.max_rounds else "no answer")
        self.done = True


def action_signature(reply: str) -> str | None:
    """What a DBBench reply does this turn, as :class:`DBEpisode` reads it: the statement it runs
    (whitespace collapsed) or the answer it commits (parsed); None for a reply with neither.

    Replies with equal signatures drive the episode identically, whatever else they say.
    """
    reply = reply or ""
    action = _ACTION.search(reply)
    if action and action.group(1) == "Operation":
        m = _SQL.search(reply)
        if m:
            return "sql " + " ".join(m.group(1).strip().replace("\n", " ").split())
    m = _ANSWER.search(reply)
    return "answer " + repr(parse_answer(m.group(1))) if m else None


# Limits of answer parsing (it runs in the worker, on model text): every intermediate value
# is bounded, so no answer can make the worker (or ``repr`` of its parse) compute for long
# or fill its memory. A value's size counts all it holds, shared items once per reference
# (``[[0] * 9] * 9`` is 81 zeros): what ``repr`` or a comparison walks through.
MAX_ANSWER_CHARS = 4_000    # the answer text (labels are a few hundred characters)
MAX_NODES = 2_000           # expression nodes
MAX_DEPTH = 100             # nesting of the expression
MAX_INT_BITS = 4096         # any int, intermediate or final
MAX_SIZE = 100_000          # any value: characters of its strings, 64-bit words of its ints, items
MAX_WORK = 1_000_000        # sizes of all values made during one parse, summed


class AnswerTooLarge(ValueError):
    """An answer whose parse would pass a limit above: a wrong answer."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int)  # bool too, as in eval


def _is_seq(x: Any) -> bool:
    return isinstance(x, (str, bytes, list, tuple))


def _scalar_size(value: Any) -> int:
    if _is_int(value):
        if int(value).bit_length() > MAX_INT_BITS:
            raise AnswerTooLarge("int too large")
        return int(value).bit_length() // 64 + 1
    if isinstance(value, (str, bytes)):
        return len(value) + 1
    return 1


class _Reader:
    """Evaluates one answer's expression within the limits, keeping each value's size."""

    def __init__(self) -> None:
        self.work = MAX_WORK

    def _made(self, value: Any, size: int) -> tuple[Any, int]:
        if size > MAX_SIZE:
            raise AnswerTooLarge("value too large")
        self.work -= size
        if self.work < 0:
            raise AnswerTooLarge("answer too large")
        return value, size

    def value(self, node: ast.AST) -> tuple[Any, int]:
        """``(value, size)`` of a literal expression with arithmetic, as ``eval`` gives the value.

        Raises:
            AnswerTooLarge: a value would pass a limit; ValueError / TypeError / ArithmeticError:
                not a literal expression, or one ``eval`` would fail on.
        """
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (str, bytes, int, float, complex, type(None))):
                raise ValueError("not a literal")  # Ellipsis
            return self._made(node.value, _scalar_size(node.value))
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            parts = [self.value(e) for e in node.elts]
            kind = {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)]
            return self._made(kind(v for v, _ in parts), 1 + sum(n for _, n in parts))
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise ValueError("dict unpacking")
            pairs = [(self.value(k), self.value(v)) for k, v in zip(node.keys, node.values)]  # type: ignore[arg-type]
            return self._made({k: v for (k, _), (v, _) in pairs}, 1 + sum(a + b for (_, a), (_, b) in pairs))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
            operand, _ = self.value(node.operand)
            out = _UNOPS[type(node.op)](operand)
            return self._made(out, _scalar_size(out))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            (a, sa), (b, sb) = self.value(node.left), self.value(node.right)
            op = type(node.op)
            if op is ast.Mult and (_is_seq(a) and _is_int(b) or _is_seq(b) and _is_int(a)):
                (seq, size), n = ((a, sa), b) if _is_seq(a) else ((b, sb), a)
                total = 1 + max(int(n), 0) * (size - 1)  # decided before repeating
                if total > MAX_SIZE:
                    raise AnswerTooLarge("repetition too large")
                return self._made(operator.mul(seq, n), total)
            if op is ast.Add and _is_seq(a) and _is_seq(b):
                if sa + sb > MAX_SIZE:
                    raise AnswerTooLarge("concatenation too large")
                return self._made(operator.add(a, b), sa + sb)
            if op is ast.Sub and isinstance(a, (set, frozenset)):
                return self._made(operator.sub(a, b), sa)
            if not all(isinstance(x, (int, float, complex)) for x in (a, b)):
                # '%0999999d' % 1 is string formatting, not arithmetic; other mixes fail in eval too
                raise TypeError("arithmetic on non-numbers")
            out = _BINOPS[op](a, b)
            return self._made(out, _scalar_size(out))
        raise ValueError(f"not a literal: {type(node).__name__}")


def _pow(a: Any, b: Any) -> Any:
    if _is_int(a) and _is_int(b) and b > 0 and abs(a) > 1 and (int(a).bit_length() - 1) * b >= MAX_INT_BITS:
        raise AnswerTooLarge("power too large")  # decided before computing it
    if not _is_int(a) and isinstance(b, (int, float)) and abs(b) > 10_000:
        raise AnswerTooLarge("power too large")  # float / complex bases: no answer needs it
    return operator.pow(a, b)


def _mul(a: Any, b: Any) -> Any:
    if _is_int(a) and _is_int(b) and int(a).bit_length() + int(b).bit_length() > MAX_INT_BITS + 1:
        raise AnswerTooLarge("product too large")  # decided before computing it
    return operator.mul(a, b)


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: _mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _pow}
_UNOPS: dict[type, Callable[[Any], Any]] = {
    ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_, ast.Invert: operator.invert}


def _shape_ok(tree: ast.AST) -> None:
    """Count nodes and depth without recursion. Raises AnswerTooLarge past MAX_NODES / MAX_DEPTH."""
    stack, nodes = [(tree, 0)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES or depth > MAX_DEPTH:
            raise AnswerTooLarge("expression too large" if nodes > MAX_NODES else "expression nested too deeply")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def read_answer(answer: str) -> list | None:
    """``list(eval(answer))`` within the limits above; ``[answer]`` where ``eval`` would fail;
    None for an answer past a limit (a wrong answer). Never raises, whatever the text."""
    try:
        if not isinstance(answer, str):
            return None
        if len(answer) > MAX_ANSWER_CHARS:
            return None
        with warnings.catch_warnings():  # answers hold invalid escape sequences
            warnings.simplefilter("ignore")
            tree = parse_python(answer.lstrip(" \t"), mode="eval")
        _shape_ok(tree)
        value, _ = _Reader().value(tree.body)
        return list(value)
    except AnswerTooLarge:
        return None
    except (SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError):
        return [answer]


def parse_answer(answer: str) -> list:
    """``list(eval(answer))`` as the official code and AgentBench compute it, without running code.

    Literals (strings, numbers, lists, tuples, sets, dicts, True / False / None) and
    arithmetic on them are evaluated as ``eval`` would; any other expression (a name, a
    call) is what makes ``eval`` fail in practice, and gives ``[answer]`` as there. A
    string becomes its characters and a dict its keys, as ``list`` makes them.

    Bounded: the text, the expression's size and depth, every intermediate int (bits) and
    sequence (length), and the work of one parse (see the ``MAX_`` limits). An answer past
    a limit gives ``[answer]`` here and is always wrong in :func:`answer_is_correct`.
    Never raises.
    """
    parsed = read_answer(answer)
    return [answer] if parsed is None else parsed


def answer_is_correct(answer: str, label: Sequence[Any]) -> bool:
    """The SELECT check of both harnesses: one value compares as floats when both parse, several as sets.

    An answer past a parse limit (:func:`parse_answer`) is wrong. Never raises.
    """
    ans = read_answer(answer)
    if ans is None:
        return False
    cor = list(label)
    try:
        if len(ans) == 1 and len(cor) == 1:
            try:
                return float(ans[0]) == float(cor[0])
            except (ValueError, TypeError, OverflowError):
                return bool(ans[0] == cor[0])
        return set(ans) == set(cor)
    except Exception:  # unhashable items, a comparison that raises: not the label
        return False


class DBBenchOptions(DatasetOptions):
    """Options of the ``dbbench`` task (see :class:`DBBenchTask`)."""

    #: option names of earlier versions, still read from old run folders
    renamed: ClassVar[dict[str, str]] = {"max_round": "max_rounds"}

    protocol: Literal["official", "agentbench"] = "official"
    backend: str = "sqlite"
    url: str | None = None
    max_rounds: int = Field(5, ge=1, le=100)
    workers: int = Field(8, ge=1, le=1024)


FISHFARM_FILE = "data_dbbench_standard_dev.jsonl"  # the official copy: standard.jsonl then dev.jsonl
FISHFARM_STANDARD_ROWS = 300


def fishfarm_file(data: str | None) -> Path | None:
    """fishfarm's DB data file when ``data`` names it, its ``data/db`` folder or the ``data`` folder above."""
    if not data or data.startswith("hf://"):
        return None
    path = Path(data)
    for candidate in (path, path / FISHFARM_FILE, path / "db" / FISHFARM_FILE):
        if candidate.name == FISHFARM_FILE and candidate.is_file():
            return candidate
    return None


def load_dbbench(data: str | None) -> list[tuple[str, int, dict]]:
    """(split, index in its file, row) for a DBBench JSONL file, AgentBench's ``data/dbbench`` folder,
    or fishfarm's copy (``evaluation/fishfarm/data/db/data_dbbench_standard_dev.jsonl``, its folder or
    the ``data`` folder above: 300 ``standard`` rows then 60 ``dev`` rows, as the official ids count).

    A folder gives ``standard.jsonl`` then ``dev.jsonl`` (those present); a file's split is its stem.

    Raises:
        ConfigError: no data, a folder without either file, or rows that are not DBBench samples.
    """
    fishfarm = fishfarm_file(data)
    if fishfarm is not None:
        parts = [("fishfarm", str(fishfarm))]
    elif data and not data.startswith("hf://") and Path(data).is_dir():
        files = [Path(data) / f"{split}.jsonl" for split in SPLITS]
        files = [f for f in files if f.is_file()]
        if not files:
            raise ConfigError(f"{data}: an AgentBench data/dbbench folder holds standard.jsonl and dev.jsonl "
                              f"(or give fishfarm's data/db/{FISHFARM_FILE})")
        parts = [(f.stem, str(f)) for f in files]
    else:
        parts = [(Path(data).stem if data and not data.startswith("hf://") else "rows", data)]
    out: list[tuple[str, int, dict]] = []
    for split, path in parts:
        for i, r in enumerate(read_rows(path)):
            if not isinstance(r.get("table"), dict) or "type" not in r:
                raise ConfigError(f"{path}: record {i} is not a DBBench sample (needs table and type)")
            if split == "fishfarm":
                out.append(("standard", i, r) if i < FISHFARM_STANDARD_ROWS else ("dev", i - FISHFARM_STANDARD_ROWS, r))
            else:
                out.append((split, i, r))
    return out


def official_ids(rows: Sequence[tuple[str, int, dict]], data: str | None) -> list[str]:
    """Sample ids of the official selection among ``rows`` (those of the splits present).

    Raises:
        ConfigError: none of the official rows is in the data, or an index lies beyond its file.
    """
    where = {(split, i): n for n, (split, i, _) in enumerate(rows)}
    sizes: dict[str, int] = {}
    for split, i, _ in rows:
        sizes[split] = max(sizes.get(split, 0), i + 1)
    chosen = []
    for item in official_samples("dbbench")["rows"]:
        key = (item["split"], int(item["index"]))
        if key[0] not in sizes:
            continue
        if key not in where:
            raise ConfigError(f"{data}: the official row {key[0]}:{key[1]} is beyond the {sizes[key[0]]} rows of "
                              f"{key[0]}.jsonl (not AgentBench's file?)")
        chosen.append(str(where[key]))
    if not chosen:
        raise ConfigError(f"{data}: select official needs AgentBench's standard.jsonl or dev.jsonl "
                          "(a file of that name, or the data/dbbench folder)")
    return chosen


@register_task("dbbench")
class DBBenchTask(DatasetTask):
    """AgentBench DBBench on SQLite (default) or a MySQL / MariaDB server.

    Args:
        name: task name in the experiment.
        data: DBBench JSONL (``description, add_description, table, label, type, answer_md5``), or
            AgentBench's ``data/dbbench`` folder (``standard.jsonl`` then ``dev.jsonl``).
        sandbox: the experiment's SandboxConfig (SQL runs in a database, not the sandbox).
        protocol: ``official`` (the official CycleQD code) or ``agentbench`` (see module docstring).
        select: ``all`` rows, or the ``official`` selection (341 of AgentBench's 360).
        backend: ``sqlite`` or ``mysql``.
        url: ``mysql://user:password@127.0.0.1:3306/`` for the mysql backend.
        max_rounds: SQL operations allowed per sample (AgentBench: 5).
        ids / limit: evaluate a subset (of the selection).
        max_new_tokens: per reply.
        workers: samples whose SQL runs at the same time (agentbench; official acts in row order, one at a time).
    """

    Options: ClassVar[type[BaseModel]] = DBBenchOptions
    executes_code: ClassVar[bool] = False

    def __init__(self, name: str = "dbbench", data: str | None = None, sandbox: SandboxConfig | None = None,
                 **options: Any):
        super().__init__(name, data, sandbox, **options)
        opts = self.options
        if opts.backend not in ("sqlite", "mysql"):
            raise ConfigError(f"dbbench backend must be 'sqlite' or 'mysql', got {opts.backend!r}")
        self.backend, self.url = opts.backend, opts.url
        self.server: MariaDBServer | None = None
        if opts.backend == "mysql":
            self.url = self._mysql_url(opts.url)
        self.protocol, self.select = opts.protocol, opts.select
        loaded = load_dbbench(data)
        self.rows = [self._official_label(split, i, r) for split, i, r in loaded]
        self.sources = [(split, i) for split, i, _ in loaded]
        pool = official_ids(loaded, data) if self.select == "official" else [str(i) for i in range(len(self.rows))]
        self._ids = select_ids(pool, opts.ids, opts.limit)
        self.max_rounds, self.max_new_tokens, self.workers = opts.max_rounds, opts.max_new_tokens, opts.workers

    def _mysql_url(self, url: str | None) -> str:
        """The server to use: ``url`` (checked, its shortcomings warned about) or cycleqd's own, started now.

        Raises:
            ConfigError: a malformed ``url``, or no server of cycleqd's own can start here.
        """
        from cycleqd.sandbox.mysql import server_warnings

        if url:
            connect = parse_mysql_url(url)
            try:
                lines = server_warnings(connect)
            except ConnectionError as e:
                lines = [f"could not check the server at start-up: {e}"]
            for line in lines:
                log.warning("dbbench %s: %s", self.name, line)
                warnings.warn(f"dbbench {self.name}: MySQL server at url: {line}", stacklevel=3)
            return url
        try:
            self.server = MariaDBServer.start()
        except ServerUnavailable as e:
            raise ConfigError(f"dbbench backend 'mysql' without url starts its own MariaDB server, which failed: {e} "
                              "(or give url: mysql://user:password@host:port/)") from None
        return self.server.url

    def close(self) -> None:
        """Stop the MariaDB server this task started (if any); also done at interpreter exit."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def answer_signatures(self, requests: Sequence[Any], answers: Sequence[str]) -> list[str | None]:
        """The action each reply proposes for its turn (see :func:`action_signature`)."""
        return [action_signature(a) for a in answers]

    def _official_label(self, split: str, index: int, row: dict) -> dict:
        """The row with the official copy's label where that differs from AgentBench's (official protocol)."""
        fix = OFFICIAL_LABELS.get((split, index))
        if self.protocol == "official" and fix and row.get("label") == fix[0]:
            return dict(row, label=list(fix[1]))
        return row

    def _open(self, row: dict) -> Database:
        t = row["table"]
        columns = [c["name"] for c in t["table_info"]["columns"]]
        rows = t["table_info"].get("rows", [])
        if self.backend == "mysql":
            return MySQLDatabase(self.url or "", t["table_name"], columns, rows)
        return SQLiteDatabase(t["table_name"], columns, rows)

    def evaluate(self, engine: Engine, ids: Sequence[str] | None = None) -> TaskResult:
        """Play every chosen sample (all live samples share one generate call per round).

        Quality is the share of correct rows among the chosen ones (a micro-average, as officially).
        """
        start = time.monotonic()
        chosen = self.chosen(ids)
        if self.protocol == "official":
            return self._evaluate_official(engine, chosen, start)
        episodes: list[DBEpisode] = []
        failed: dict[str, str] = {}
        early: dict[str, SampleResult] = {}

        finish = self._finish
        for i in chosen:
            try:
                ep = DBEpisode(i, self.rows[int(i)], self._open(self.rows[int(i)]), self.max_rounds, self.protocol)
            except Exception as e:  # a table that cannot be built is that sample's failure
                failed[i] = f"could not create the table: {type(e).__name__}: {e}"
                continue
            if self.protocol == "agentbench":  # scored, and its database dropped, when its episode ends
                ep.on_done = lambda done: early.__setitem__(done.sample_id, finish(done))
            episodes.append(ep)
        try:
            errors = run_episodes(engine, episodes, max_new_tokens=self.max_new_tokens, workers=self.workers)
        except BaseException:
            for ep in episodes:
                if ep.sample_id not in early:
                    try:
                        ep.db.close()
                    except Exception:
                        pass
            raise
        by_id = {ep.sample_id: ep for ep in episodes}
        samples = []
        for i in chosen:
            if i in failed:
                samples.append(SampleResult(i, 0.0, failed[i]))
            elif i in early:
                samples.append(early[i] if i not in errors else replace(early[i], error=errors[i]))
            else:  # the official order, or an episode that ended with an error
                samples.append(finish(by_id[i], errors.get(i)))
        return task_result(self.name, samples, start)

    def _finish(self, ep: DBEpisode, error: str | None = None) -> SampleResult:
        """Score a finished episode, then close its database: under ``agentbench`` that drops the
        sample's database (and user) on a server; under ``official``, the row's table name's database."""
        try:
            return self._score(ep, error)
        except Exception as e:  # scoring must not crash the task
            return SampleResult(ep.sample_id, 0.0, f"scoring failed: {type(e).__name__}: {e}")
        finally:
            try:
                ep.db.close()
            except Exception:
                pass

    def _evaluate_official(self, engine: Engine, chosen: Sequence[str], start: float) -> TaskResult:
        """fishfarm's evaluation: every chosen row's database made up front on one server, one database
        per table name (:mod:`cycleqd.sandbox.shared_databases`); replies acted on in row order within
        each round; a row is scored, and its database dropped, when its episode ends."""
        shared: MariaDBShared | SQLiteShared
        shared = MariaDBShared(parse_mysql_url(self.url or "")) if self.backend == "mysql" else SQLiteShared()
        done: dict[str, SampleResult] = {}

        finish = self._finish
        try:
            views = {}
            for i in chosen:
                t = self.rows[int(i)].get("table", {})
                columns = [c["name"] for c in t["table_info"]["columns"]]
                shared.create(t["table_name"], columns, t["table_info"].get("rows", []))
                views[i] = SharedDatabase(shared, t["table_name"], columns)
            episodes = []
            for i in chosen:
                ep = DBEpisode(i, self.rows[int(i)], views[i], self.max_rounds, self.protocol)
                ep.on_done = lambda ended: done.__setitem__(ended.sample_id, finish(ended))
                episodes.append(ep)
            # one worker: the rows act in order, as fishfarm's loop does (they share databases)
            errors = run_episodes(engine, episodes, max_new_tokens=self.max_new_tokens, workers=1)
            samples = []
            for ep in episodes:
                i = ep.sample_id
                res = done.get(i) or finish(ep, errors.get(i))
                samples.append(replace(res, error=errors[i]) if i in errors and res.error is None else res)
        finally:
            shared.close()
        return task_result(self.name, samples, start)

    def _score(self, ep: DBEpisode, error: str | None) -> SampleResult:
        row = ep.row
        kind = row["type"][0]
        split, index = self.sources[int(ep.sample_id)]
        detail: dict[str, Any] = {"type": kind, "rounds": ep.rounds, "status": ep.status, "answer": ep.answer,
                                  "source": f"{split}:{index}", "conversation": ep.messages}
        if kind in MUTATING:
            got = ep.db.table_hash()
            detail["hash"] = got
            ok = got == row.get("answer_md5")
        else:
            ok = answer_is_correct(ep.answer, row.get("label") or [])
        return SampleResult(ep.sample_id, 1.0 if ok else 0.0, error, detail)
