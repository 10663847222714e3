"""AgentBench DBBench: answer questions about (or modify) a table with SQL, over up to 5 rounds.

Follows the AgentBench protocol (``src/server/tasks/dbbench``):

- every column is TEXT; the table is created and filled per sample;
- the conversation is the instruction prompt, an agent ``Ok.``, then the question
  with the table description;
- ``Action: Operation`` + a ```sql block runs the statement (newlines turned into
  spaces); the raw result (``str`` of the fetched rows, or the error text, cut at
  800 characters) is the next user turn; up to ``max_round`` operations;
- ``Action: Answer`` + ``Final Answer: [...]`` ends the episode;
- SELECT-type questions compare the answer list with the label (one value: as
  floats if both parse, else as strings; several: as sets); INSERT / UPDATE /
  DELETE compare a hash of the table afterwards with ``answer_md5``:
  ``md5(group_concat(rowhash ORDER BY rowhash))`` over ``rowhash =
  left(md5(concat_ws(',', columns)), 5)``.

Backends: ``sqlite`` (in process, the default; emulates the MySQL behaviour the
scoring depends on: the table hash with MySQL's 1024-byte ``group_concat``
limit, case-insensitive text comparison, MySQL-style result rows) and ``mysql``
(a MySQL / MariaDB server at ``url``, one throw-away database per sample).
"""
from __future__ import annotations

import ast
import hashlib
import re
import sqlite3
import time
import uuid
from typing import Any, ClassVar, Protocol, Sequence
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.base import Engine
from cycleqd.registry import register_task
from cycleqd.tasks._agent import read_rows, run_episodes, select_ids, task_result
from cycleqd.tasks.base import SampleResult, TaskResult

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
MAX_RESULT_CHARS = 800
GROUP_CONCAT_MAX_LEN = 1024  # MySQL's default; the recorded hashes depend on it
NO_RESULT = "No result set to fetch from."  # what AgentBench's MySQL client reports for INSERT/UPDATE/DELETE

_ACTION = re.compile(r"Action: (.*?)\n")
_SQL = re.compile(r"```sql\n([\s\S]*?)\n```")
_ANSWER = re.compile(r"\nFinal Answer:(.*)")


def _cut(text: str) -> str:
    return text[:MAX_RESULT_CHARS] + "[TRUNCATED]" if len(text) > MAX_RESULT_CHARS else text


def _cell(v: Any) -> str | None:
    """A data value as MySQL stores it in a TEXT column (the client sends Python reprs)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return repr(v)
    return str(v)


def table_hash(rows: Sequence[Sequence[Any]]) -> str:
    """AgentBench's table hash, as the string of the fetched result row.

    ``str([(md5(group_concat(left(md5(concat_ws(',', cols)), 5) order by 1)),)])``;
    NULLs are skipped by concat_ws, group_concat stops at 1024 bytes, and an empty
    table gives ``[(None,)]``.
    """
    if not rows:
        return str([(None,)])
    hashes = sorted(hashlib.md5(",".join(_text(x) for x in r if x is not None).encode()).hexdigest()[:5]
                    for r in rows)
    joined = ",".join(hashes).encode()[:GROUP_CONCAT_MAX_LEN]
    return str([(hashlib.md5(joined).hexdigest(),)])


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, float) and v.is_integer():
        return repr(v)
    return str(v)


class Database(Protocol):
    """One sample's database: run a statement the AgentBench way, hash the table."""

    def execute(self, sql: str) -> str:
        ...

    def table_hash(self) -> str:
        ...

    def close(self) -> None:
        ...


def _mysql_like_sqlite(con: sqlite3.Connection) -> None:
    """MySQL functions models use that SQLite lacks (or names differently)."""
    def concat(*a: Any) -> str | None:
        return None if any(x is None for x in a) else "".join(_text(x) for x in a)

    def concat_ws(sep: Any, *a: Any) -> str | None:
        return None if sep is None else str(sep).join(_text(x) for x in a if x is not None)

    con.create_function("CONCAT", -1, concat, deterministic=True)
    con.create_function("CONCAT_WS", -1, concat_ws, deterministic=True)
    con.create_function("MD5", 1, lambda s: None if s is None else hashlib.md5(_text(s).encode()).hexdigest(),
                        deterministic=True)
    con.create_function("IF", 3, lambda c, a, b: a if c else b, deterministic=True)
    con.create_function("LEFT", 2, lambda s, n: None if s is None else _text(s)[: max(int(n), 0)], deterministic=True)
    con.create_function("RIGHT", 2, lambda s, n: None if s is None else (_text(s)[-int(n):] if int(n) > 0 else ""),
                        deterministic=True)


class SQLiteDatabase:
    """In-process SQLite table with TEXT columns compared case-insensitively (like MySQL's default collation)."""

    def __init__(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]):
        self.table, self.columns = table, list(columns)
        self.con = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        _mysql_like_sqlite(self.con)
        cols = ", ".join(f"{_q(c)} TEXT COLLATE NOCASE" for c in self.columns)
        self.con.execute(f"CREATE TABLE {_q(table)} ({cols})")
        marks = ", ".join("?" * len(self.columns))
        self.con.executemany(f"INSERT INTO {_q(table)} VALUES ({marks})",
                             [[_cell(v) for v in r] for r in rows])

    def execute(self, sql: str) -> str:
        try:
            cur = self.con.execute(sql)
            if cur.description is None:
                return NO_RESULT
            return _cut(str(cur.fetchall()))
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as e:
            return _cut(str(e))

    def table_hash(self) -> str:
        try:
            cols = ", ".join(_q(c) for c in self.columns)
            return table_hash(self.con.execute(f"SELECT {cols} FROM {_q(self.table)}").fetchall())
        except sqlite3.Error as e:
            return str(e)

    def close(self) -> None:
        self.con.close()


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def parse_mysql_url(url: str) -> dict[str, Any]:
    """``mysql://user:password@host:port/db`` (or ``?unix_socket=/path``) -> pymysql.connect kwargs.

    Raises:
        ConfigError: not a mysql:// URL.
    """
    u = urlparse(url)
    if u.scheme not in ("mysql", "mariadb", "mysql+pymysql"):
        raise ConfigError(f"dbbench url {url!r} must look like mysql://user:password@127.0.0.1:3306/")
    kw: dict[str, Any] = {"host": u.hostname or "127.0.0.1", "port": u.port or 3306,
                          "user": unquote(u.username or "root"), "password": unquote(u.password or "")}
    for part in filter(None, u.query.split("&")):
        k, _, v = part.partition("=")
        if k == "unix_socket":
            kw["unix_socket"] = unquote(v)
    return kw


class MySQLDatabase:
    """The sample's table in a fresh database on a MySQL / MariaDB server (dropped on close)."""

    def __init__(self, url: str, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]):
        try:
            import pymysql
        except ImportError:
            raise ConfigError("dbbench backend 'mysql' needs `pip install pymysql`") from None
        self.pymysql = pymysql
        self.table, self.columns = table, list(columns)
        self.db = f"cq_{uuid.uuid4().hex[:16]}"  # table names repeat across samples; databases must not
        self.con = pymysql.connect(**parse_mysql_url(url), autocommit=True, charset="utf8mb4",
                                   connect_timeout=10)
        self.init_error: str | None = None
        with self.con.cursor() as cur:
            cur.execute("SET SESSION group_concat_max_len = %s", (GROUP_CONCAT_MAX_LEN,))
            cur.execute(f"CREATE DATABASE {_q(self.db)} CHARACTER SET utf8mb4")
            cur.execute(f"USE {_q(self.db)}")
            cols = ", ".join(f"{_q(c)} TEXT" for c in self.columns)
            try:
                cur.execute(f"CREATE TABLE {_q(table)} ({cols})")
            except pymysql.MySQLError as e:
                # AgentBench carries on when its set-up SQL fails (the error is only
                # printed); the sample is then played against the empty database.
                self.init_error = str(e)
                return
            if rows:
                marks = "(" + ", ".join(["%s"] * len(self.columns)) + ")"
                cur.executemany(f"INSERT INTO {_q(table)} ({', '.join(_q(c) for c in self.columns)}) VALUES {marks}",
                                [[_cell(v) for v in r] for r in rows])

    def execute(self, sql: str) -> str:
        try:
            with self.con.cursor() as cur:
                cur.execute(f"USE {_q(self.db)}")
                cur.execute(sql)
                if cur.description is None:
                    return NO_RESULT
                return _cut(str(list(cur.fetchall())))
        except self.pymysql.MySQLError as e:
            args = getattr(e, "args", ())
            text = f"{args[0]}: {args[1]}" if len(args) >= 2 else str(e)
            return _cut(text)

    def table_hash(self) -> str:
        cols = ", ".join(_q(c) for c in self.columns)
        query = (f"SELECT md5(group_concat(rowhash ORDER BY rowhash)) AS hash FROM "
                 f"(SELECT substring(MD5(CONCAT_WS(',', {cols})), 1, 5) AS rowhash FROM {_q(self.table)}) AS sub")
        return self.execute(query)

    def close(self) -> None:
        try:
            with self.con.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS {_q(self.db)}")
        finally:
            self.con.close()


class DBEpisode:
    """One DBBench sample played out round by round (see module docstring)."""

    def __init__(self, sample_id: str, row: dict, db: Database, max_round: int):
        self.sample_id, self.row, self.db, self.max_round = sample_id, row, db, max_round
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

    def step(self, reply: str) -> None:
        reply = reply or ""
        self.messages.append({"role": "assistant", "content": reply})
        self.turn += 1
        action = _ACTION.search(reply)
        if action and action.group(1) == "Operation" and self.rounds < self.max_round:
            m = _SQL.search(reply)
            if not m:
                self.status, self.done = "invalid action: no ```sql block", True
                return
            result = self.db.execute(m.group(1).strip().replace("\n", " "))
            self.messages.append({"role": "user", "content": result or ""})
            self.rounds += 1
            return
        m = _ANSWER.search(reply)
        self.answer = m.group(1) if m else ""
        self.status = "answered" if m else ("round limit" if self.rounds >= self.max_round else "no answer")
        self.done = True


def answer_is_correct(answer: str, label: Sequence[Any]) -> bool:
    """AgentBench's SELECT check: one value compares as floats when both parse, several as sets."""
    try:
        ans = list(ast.literal_eval(answer.strip()))
    except Exception:  # any non-list answer is a one-element answer, as in AgentBench
        ans = [answer]
    cor = list(label)
    if len(ans) == 1 and len(cor) == 1:
        try:
            return float(ans[0]) == float(cor[0])
        except (ValueError, TypeError):
            return ans[0] == cor[0]
    try:
        return set(ans) == set(cor)
    except TypeError:
        return False


@register_task("dbbench")
class DBBenchTask:
    """AgentBench DBBench on SQLite (default) or a MySQL / MariaDB server.

    Args:
        name: task name in the experiment.
        data: DBBench JSONL (``description, add_description, table, label, type, answer_md5``).
        sandbox: the experiment's SandboxConfig (SQL runs in a database, not the sandbox).
        backend: ``sqlite`` or ``mysql``.
        url: ``mysql://user:password@127.0.0.1:3306/`` for the mysql backend.
        max_round: SQL operations allowed per sample (AgentBench: 5).
        ids / limit: evaluate a subset.
        max_new_tokens: per reply.
        workers: samples whose SQL runs at the same time.
    """

    class Options(BaseModel):
        """The keyword options of the constructor, as a config's ``options`` gives them."""

        model_config = ConfigDict(frozen=True, extra="forbid")
        backend: str = "sqlite"
        url: str | None = None
        max_round: int = 5
        ids: list[Any] | None = None
        limit: int | None = None
        max_new_tokens: int = 512
        workers: int = 8

    executes_code: ClassVar[bool] = False

    def __init__(self, name: str = "dbbench", data: str | None = None, sandbox: SandboxConfig | None = None, *,
                 backend: str = "sqlite", url: str | None = None, max_round: int = 5,
                 ids: Sequence[Any] | None = None, limit: int | None = None, max_new_tokens: int = 512,
                 workers: int = 8):
        if backend not in ("sqlite", "mysql"):
            raise ConfigError(f"dbbench backend must be 'sqlite' or 'mysql', got {backend!r}")
        if backend == "mysql":
            if not url:
                raise ConfigError("dbbench backend 'mysql' needs url: mysql://user:password@host:port/")
            parse_mysql_url(url)
        self.name, self.backend, self.url = name, backend, url
        self.sandbox = sandbox or SandboxConfig()
        self.rows = read_rows(data)
        for i, r in enumerate(self.rows):
            if not isinstance(r.get("table"), dict) or "type" not in r:
                raise ConfigError(f"{data}: record {i} is not a DBBench sample (needs table and type)")
        self._ids = select_ids([str(i) for i in range(len(self.rows))], ids, limit)
        self.max_round, self.max_new_tokens, self.workers = int(max_round), int(max_new_tokens), int(workers)

    def sample_ids(self) -> list[str]:
        return list(self._ids)

    def _open(self, row: dict) -> Database:
        t = row["table"]
        columns = [c["name"] for c in t["table_info"]["columns"]]
        rows = t["table_info"].get("rows", [])
        if self.backend == "mysql":
            return MySQLDatabase(self.url or "", t["table_name"], columns, rows)
        return SQLiteDatabase(t["table_name"], columns, rows)

    def evaluate(self, engine: Engine, ids: Sequence[str] | None = None) -> TaskResult:
        """Play every chosen sample (all live samples share one generate call per round)."""
        start = time.monotonic()
        chosen = select_ids(self._ids, ids, None) if ids is not None else list(self._ids)
        episodes: list[DBEpisode] = []
        failed: dict[str, str] = {}
        for i in chosen:
            try:
                episodes.append(DBEpisode(i, self.rows[int(i)], self._open(self.rows[int(i)]), self.max_round))
            except Exception as e:  # a table that cannot be built is that sample's failure
                failed[i] = f"could not create the table: {type(e).__name__}: {e}"
        errors = run_episodes(engine, episodes, max_new_tokens=self.max_new_tokens, workers=self.workers)
        by_id = {ep.sample_id: ep for ep in episodes}
        samples = []
        for i in chosen:
            if i in failed:
                samples.append(SampleResult(i, 0.0, failed[i]))
                continue
            ep = by_id[i]
            try:
                samples.append(self._score(ep, errors.get(i)))
            except Exception as e:  # scoring must not crash the task
                samples.append(SampleResult(i, 0.0, f"scoring failed: {type(e).__name__}: {e}"))
            finally:
                try:
                    ep.db.close()
                except Exception:
                    pass
        return task_result(self.name, samples, start)

    def _score(self, ep: DBEpisode, error: str | None) -> SampleResult:
        row = ep.row
        kind = row["type"][0]
        detail: dict[str, Any] = {"type": kind, "rounds": ep.rounds, "status": ep.status, "answer": ep.answer}
        if kind in MUTATING:
            got = ep.db.table_hash()
            detail["hash"] = got
            ok = got == row.get("answer_md5")
        else:
            ok = answer_is_correct(ep.answer, row.get("label") or [])
        return SampleResult(ep.sample_id, 1.0 if ok else 0.0, error, detail)
