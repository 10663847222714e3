"""AgentBench OS interaction: solve a task in a Linux shell over up to 5 rounds.

Follows AgentBench (``src/server/tasks/os_interaction/task.py``): the same
instruction prompt and one-shot example, ``Act: bash`` (```bash blocks, run in the
episode's shell), ``Act: finish`` and ``Act: answer(...)`` parsed the same way
(the last ``Act:`` line wins), OS output cut to 780 characters plus a notice when
longer than 800, and the same judging: ``match`` (exact after strip, or regex) or
a chain of ``check`` scripts where ``null`` runs the ``example`` script and each
script receives the answer and the previous scripts' outputs as arguments.

``protocol`` picks where the official CycleQD code (fishfarm) and AgentBench differ:
``official`` (default) uses fishfarm's wording of the prompt and judges *every* episode,
one that ends without an answer (an invalid action, the round limit, a failed step)
with the answer ``""``, so a check that looks only at the machine can still pass;
``agentbench`` fails such episodes unjudged.

``data`` may be fishfarm's ``samples.pkl`` (the official code's own copy of all 170
problems, with the descriptions it used; see :mod:`cycleqd.tasks.fishfarm_os`), a problem
file (JSON list / JSONL) or AgentBench's ``data/os_interaction`` folder: every problem file ``data/<n>.json`` and ``data/<n>/*.json``, numbered ones in
number order then the rest (``dev.json``) by name, each file's scripts in
``scripts/<n>/``; sample ids are 0-based indexes into that concatenation.
``select: official`` keeps the problems the official code scores (shipped in
:mod:`cycleqd.tasks.official`), ``runs: 5`` averages five plays as it does.

Each episode runs in a fresh :class:`cycleqd.sandbox.os_env.OSSession` (bubblewrap,
Ubuntu-like writable layer): ``create.init`` scripts run as separate processes,
``start`` runs inside the agent's shell, as in AgentBench's containers. The whole
evaluation is repeated ``runs`` times (the paper: 5) and averaged.
"""
from __future__ import annotations

import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, Field

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.protocol import Engine
from cycleqd.registry import register_task
from cycleqd.sandbox.os_env import OSSession
from cycleqd.tasks.dataset import (
    DatasetOptions,
    DatasetTask,
    error_text,
    read_rows,
    run_episodes,
    select_ids,
)
from cycleqd.tasks.fishfarm_os import FishfarmSample, read_samples, samples_file
from cycleqd.tasks.official import official_samples
from cycleqd.tasks.protocol import SampleResult

PROMPT = """You are an assistant that will act like a person, I will play the role of linux(ubuntu) operating system. Your goal is to implement the operations required by me or answer to the question proposed by me. For each of your turn, you should first think what you should do, and then take exact one of the three actions: "bash", "finish" or "answer". 

1. If you think you should execute some bash code, take bash action, and you should print like this:

Think: put your thought here.

Act: bash

```bash
# put your bash code here
```

2. If you think you have finished the task, take finish action, and you should print like this:

Think: put your thought here.

Act: finish

3. If you think you have got the answer to the question, take answer action, and you should print like this:

Think: put your thought here.

Act: answer(Your answer to the question should be put in this pair of parentheses)

If the output is too long, I will truncate it. The truncated output is not complete. You have to deal with the truncating problem by yourself. Attention, your bash code should not contain any input operation. Once again, you should take only exact one of the three actions in each turn.\n\n"""  # noqa: W291

# fishfarm's wording of the same prompt (its one difference: "I'will play the role")
OFFICIAL_PROMPT = PROMPT.replace("I will play the role", "I'will play the role", 1)

ONE_SHOT = [
    {"role": "user", "content": 'tell me how many files are in the directory "/etc"?'},
    {"role": "assistant", "content": "Think: To count the files in /etc, I need to print all the files in it.\n\n"
                                     "Act: bash\n\n```bash\nls /etc\n```"},
    {"role": "user", "content": "The output of the OS:\ncpi cron.hourly fuse.conf iproute2 lvm networkd-dispatcher "
                                "protocols selinux tmpfiles.d [truncated because the output is too long]"},
    {"role": "assistant", "content": "Think: The output has been truncated because it is too long, so I need to "
                                     "count files by script directly.\n\nAct: bash\n\n```bash\nls -1 /etc | wc -l\n```"},
    {"role": "user", "content": "The output of the OS:\n220"},
    {"role": "assistant", "content": "Think: Now I get the answer, it is 220.\n\nAct: answer(220)"},
]

Script = tuple[str, str]  # (language, source)


@dataclass(frozen=True)
class OSProblem:
    """One task: description, set-up scripts and how it is judged."""

    id: str
    description: str
    init: tuple[Script, ...] = ()
    start: Script | None = None
    match: dict | None = None
    check: tuple[Script | None, ...] | None = None
    example: Script | None = None
    extra: dict = field(default_factory=dict)
    image: str = "default"  # the machine's image (``create.local``: default, packages; see sandbox.os_rootfs)


def _load_script(obj: Any, root: Path) -> Script | None:
    if obj is None:
        return None
    if isinstance(obj, str):
        return "bash", obj
    if not isinstance(obj, dict):
        raise ConfigError(f"bad script object {obj!r}")
    lang = obj.get("language", "bash")
    if "file" in obj:
        path = root / obj["file"]
        if not path.is_file():
            raise ConfigError(f"script file {str(path)!r} not found")
        return lang, path.read_text(encoding="utf-8")
    if "code" in obj:
        return lang, obj["code"]
    raise ConfigError(f"script object without file or code: {obj!r}")


def load_problems(rows: Sequence[dict], scripts: Path, *, source: str = "", first_id: int = 0) -> list[OSProblem]:
    """AgentBench OS configs -> problems (``file`` scripts are read relative to ``scripts``).

    Problem ``k`` of ``rows`` gets the id ``first_id + k`` and ``extra`` ``{"file": source, "index": k}``.

    Raises:
        ConfigError: a record without ``description`` / ``evaluation``, or a missing script.
    """
    out = []
    for i, item in enumerate(rows):
        if "description" not in item or "evaluation" not in item:
            raise ConfigError(f"OS record {i} needs description and evaluation")
        init: list[Script] = []
        create = item.get("create")
        if isinstance(create, dict) and "init" in create:
            objs = create["init"] if isinstance(create["init"], list) else [create["init"]]
            init = [s for s in (_load_script(o, scripts) for o in objs) if s is not None]
        ev = item["evaluation"]
        match = check = example = None
        if "match" in ev:
            match = {"answer": ev["match"], "strip": True} if isinstance(ev["match"], str) else dict(ev["match"])
        elif "check" in ev:
            objs = ev["check"] if isinstance(ev["check"], list) else [ev["check"]]
            check = tuple(_load_script(o, scripts) for o in objs)
            if "example" in ev:
                example = _load_script(ev["example"], scripts)
        else:
            raise ConfigError(f"OS record {i}: evaluation needs match or check")
        out.append(OSProblem(id=str(first_id + i), description=item["description"], init=tuple(init),
                             start=_load_script(item.get("start"), scripts), match=match, check=check,
                             example=example, extra={"file": source, "index": i},
                             image=_image_name(create)))
    return out


def _image_name(create: Any) -> str:
    """AgentBench's ``create.local`` (``local-os/<name>``): ``packages`` adds npm; anything else is ``default``."""
    name = create.get("local", "default") if isinstance(create, dict) else "default"
    return "packages" if name == "packages" else "default"


def fishfarm_problems(samples: Sequence[FishfarmSample]) -> list[OSProblem]:
    """fishfarm's pickled samples -> problems: sample ``k`` of the list gets the id ``k`` (the official
    code's sample id); ``extra`` names its AgentBench file and index and keeps its conversation."""
    out = []
    for s in samples:
        c = s.config
        out.append(OSProblem(id=str(s.position), description=c["description"], init=tuple(c.get("init_script") or ()),
                             start=c.get("start"), match=dict(c["match"]) if c.get("match") else None,
                             check=tuple(c["check"]) if c.get("check") else None, example=c.get("example_script"),
                             image=_image_name({"local": str(c.get("image") or "").rsplit("/", 1)[-1]}),
                             extra={"file": s.file, "index": s.index, "conversation": s.conversation}))
    return out


def _number_first(p: Path) -> tuple:
    stem = p.stem if p.is_file() else p.name
    return (0, int(stem), "") if stem.isdigit() else (1, 0, p.name)


def problem_files(data: str, scripts: str | None = None) -> list[tuple[str, Path, Path]]:
    """(name relative to AgentBench's ``data/os_interaction/data``, problem file, its scripts folder).

    ``data`` is AgentBench's ``data/os_interaction`` folder (or its ``data`` folder), or one
    problem file: inside such a checkout its scripts are ``scripts/<n>/`` for ``data/<n>/x.json``
    or ``data/<n>.json``; elsewhere ``scripts/<file stem>/`` beside the file. ``scripts``
    overrides the folder of a single file.

    Raises:
        ConfigError: a folder that is not laid out like AgentBench's.
    """
    path = Path(data)
    if path.is_dir():
        root = path if (path / "data").is_dir() else path.parent
        if not (root / "data").is_dir() or not (root / "scripts").is_dir():
            raise ConfigError(f"{data}: expected AgentBench's data/os_interaction folder (with data/ and scripts/)")
        out = []
        for entry in sorted((root / "data").iterdir(), key=_number_first):
            if entry.is_dir():
                files = sorted(f for f in entry.iterdir() if f.suffix in (".json", ".jsonl"))
                out += [(f"{entry.name}/{f.name}", f, root / "scripts" / entry.name) for f in files]
            elif entry.suffix in (".json", ".jsonl"):
                out.append((entry.name, entry, root / "scripts" / entry.stem))
        if not out:
            raise ConfigError(f"{data}: no problem files in {root / 'data'}")
        return out
    parent = path.parent
    if parent.name == "data" and (parent.parent / "scripts").is_dir():
        name, folder = path.name, parent.parent / "scripts" / path.stem
    elif parent.parent.name == "data" and (parent.parent.parent / "scripts").is_dir():
        name, folder = f"{parent.name}/{path.name}", parent.parent.parent / "scripts" / parent.name
    else:
        name, folder = path.name, parent / "scripts" / path.stem
    return [(name, path, Path(scripts) if scripts else folder)]


def official_selection(problems: Sequence[OSProblem], data: str) -> list[str]:
    """Ids of the official problems among ``problems`` (those of the problem files present).

    The official list names AgentBench's files; a file renamed since (``renamed`` in the
    list) is found under its new name. Files of the list that are absent are skipped with a
    warning, so one problem file (e.g. ``dev.json``) selects its own official problems.

    Raises:
        ConfigError: an official index beyond its file, or no official problem in the data.
    """
    spec = official_samples("os_interaction")
    renamed = {old: new.split(" ", 1)[0] for old, new in spec.get("renamed", {}).items()}
    where = {(p.extra["file"], p.extra["index"]): p.id for p in problems}
    sizes: dict[str, int] = {}
    for p in problems:
        sizes[p.extra["file"]] = sizes.get(p.extra["file"], 0) + 1
    chosen, missing = [], set()
    for item in spec["problems"]:
        name = item["file"] if item["file"] in sizes else renamed.get(item["file"], item["file"])
        if name not in sizes:
            missing.add(item["file"])
            continue
        if (name, int(item["index"])) not in where:
            raise ConfigError(f"{data}: official problem {item['index']} of {name} is beyond its "
                              f"{sizes[name]} problems (not AgentBench's file?)")
        chosen.append(where[(name, int(item["index"]))])
    if not chosen:
        raise ConfigError(f"{data}: none of the official OS problem files is here (AgentBench's "
                          "data/os_interaction folder, or one of its problem files such as dev.json)")
    if missing and Path(data).is_dir():
        warnings.warn(f"{data}: official problem files not found, their problems are left out: {sorted(missing)}",
                      stacklevel=3)
    return chosen


def extract_action(raw: str) -> dict[str, Any]:
    """AgentBench's parser: the last ``Act:`` line decides; bash code = all ```bash blocks."""
    ret: dict[str, Any] = {"thought": "\n".join(re.findall(r"Think:\s*(.+)", raw)), "action": None, "content": None}
    for action in re.findall(r"Act:\s*(.+)", raw)[::-1]:
        low = action.lower()
        if low.startswith("bash"):
            ret["action"] = "bash"
            break
        if low.startswith("finish"):
            ret["action"] = "commit"
            break
        if low.startswith("answer"):
            content = action[6:].strip()
            left, right = content.find("("), content.rfind(")")
            if left == -1 or right == -1:
                continue
            ret["action"], ret["content"] = "commit", content[left + 1:right]
            break
    if ret["action"] == "bash":
        ret["content"] = "\n\n".join(re.findall(r"```bash\n(.*?)\n```", raw, re.DOTALL))
    return ret


def action_signature(reply: str) -> str | None:
    """What an OS reply does this turn, as :class:`OSEpisode` reads it: the bash code it runs
    (blank lines dropped), the answer it commits, or ``finish``; None for an invalid action."""
    act = extract_action(reply or "")
    if act["action"] == "bash":
        return "bash " + "\n".join(line.rstrip() for line in act["content"].splitlines() if line.strip())
    if act["action"] == "commit":
        return "commit " + repr(act["content"])
    return None


def os_feedback(output: str) -> str:
    """The user turn after a bash action (AgentBench's truncation at 800 characters)."""
    if len(output) > 800:
        output = output[:780] + "\n[truncated because the output is too long]"
    return "The output of the OS:\n\n" + output if output else "The output of the OS is empty."


class OSEpisode:
    """One OS problem played round by round in its own session."""

    def __init__(self, problem: OSProblem, session: OSSession, max_rounds: int, command_timeout: float,
                 prompt: str = PROMPT, protocol: str = "official",
                 conversation: Sequence[dict[str, str]] | None = None):
        self.sample_id = problem.id
        self.protocol = protocol
        self.problem, self.session = problem, session
        self.max_rounds, self.command_timeout = max_rounds, command_timeout
        first = dict(ONE_SHOT[0])
        first["content"] = prompt + "Now, my problem is:\n\n" + first["content"]
        self.messages = [first, *[dict(m) for m in ONE_SHOT[1:]],
                         {"role": "user", "content": "Now, I will start a new problem in a new OS. "
                                                     "My problem is:\n\n" + problem.description}]
        if conversation is not None:  # the official code's own pickled conversation, as it is
            self.messages = [dict(m) for m in conversation]
        self.turn = 0
        self.done = False
        self.committed = False
        self.answer: str | None = None
        self.status = "running"

    def step(self, reply: str) -> None:
        reply = reply or ""
        self.messages.append({"role": "assistant", "content": reply})
        self.turn += 1
        act = extract_action(reply)
        if act["action"] == "commit":
            self.committed, self.answer, self.status, self.done = True, act["content"], "committed", True
            return
        if act["action"] != "bash":
            self.status, self.done = "invalid action", True
            return
        result = self.session.run(act["content"], timeout=self.command_timeout)
        self.messages.append({"role": "user", "content": os_feedback(result.output)})
        if self.turn >= self.max_rounds:
            self.status, self.done = "round limit", True


def judge(problem: OSProblem, answer: str | None, session: OSSession, timeout: float = 30.0) -> bool:
    """AgentBench's verdict for a committed answer (``None`` for ``Act: finish``)."""
    if problem.match is not None:
        if isinstance(answer, str) and problem.match.get("strip", False):
            answer = answer.strip()
        if "answer" in problem.match:
            return answer == problem.match["answer"]
        if "regex" in problem.match:
            return isinstance(answer, str) and re.search(problem.match["regex"], answer) is not None
        return False
    params = [str(answer)]
    for script in problem.check or ():
        if script is None:
            script = problem.example
        if script is None:
            return False
        r = session.run_script(script[0], script[1], params, timeout=timeout, view="check")
        if r.exit_code != 0:
            return False
        params.append(r.output)
    return True


class OSInteractionOptions(DatasetOptions):
    """Options of the ``os_interaction`` task (see :class:`OSInteractionTask`)."""

    protocol: Literal["official", "agentbench"] = "official"
    scripts: str | None = None
    runs: int = Field(1, ge=1, le=100)
    max_rounds: int = Field(5, ge=1, le=100)
    command_timeout: float = Field(10.0, gt=0, le=3600)
    workers: int = Field(4, ge=1, le=1024)
    chunk: int = Field(32, ge=1, le=256)
    memory_mb: int | None = Field(None, ge=64, le=1 << 20)


@register_task("os_interaction")
class OSInteractionTask(DatasetTask):
    """AgentBench OS interaction in the bubblewrap sandbox (see module docstring).

    Args:
        name: task name in the experiment.
        data: an AgentBench OS problem file (JSON list / JSONL), or AgentBench's
            ``data/os_interaction`` folder (every problem file, each with its scripts folder),
            or fishfarm's ``samples.pkl`` (or its ``configs`` / ``os_interaction`` folder) in a
            CycleQD checkout: the official code's own problems, read without unpickling code
            (:mod:`cycleqd.tasks.fishfarm_os`); under ``official`` their pickled conversations
            are what the model is shown.
        sandbox: the experiment's SandboxConfig (``allow_code_execution`` must be true).
        protocol: ``official`` (the official CycleQD code) or ``agentbench`` (see module docstring).
        select: ``all`` problems, or the ``official`` selection (110 of AgentBench's 170).
        scripts: folder a single problem file's ``file`` scripts are relative to (default:
            AgentBench's ``scripts/<n>/``, or ``scripts/<data stem>`` beside the file).
        runs: how many times the whole evaluation is repeated and averaged (officially 5).
        max_rounds: model turns per episode (CycleQD: 5).
        command_timeout: seconds per bash action.
        ids / limit: evaluate a subset (of the selection).
        max_new_tokens: per reply.
        workers: episodes acting at the same time.
        chunk: episodes played together; the problems are played chunk after chunk, as fishfarm
            plays its samples in chunks of its 32 workers (each machine holds open files).
        memory_mb: memory of an episode's machine (default: max(sandbox.memory_mb, 2048)).
    """

    Options: ClassVar[type[BaseModel]] = OSInteractionOptions
    executes_code: ClassVar[bool] = True

    def __init__(self, name: str = "os_interaction", data: str | None = None, sandbox: SandboxConfig | None = None,
                 **options: Any):
        super().__init__(name, data, sandbox, **options)
        opts = self.options
        self.protocol, self.select = opts.protocol, opts.select
        if not data:
            raise ConfigError("task needs `data` (an AgentBench OS problem file or data/os_interaction folder)")
        pickled = None if data.startswith("hf://") else samples_file(data)
        if data.startswith("hf://"):
            self.problems = load_problems(read_rows(data), Path(opts.scripts or "."), source=data)
        elif pickled is not None:  # fishfarm's own copy (the official code's problems and words)
            self.problems = fishfarm_problems(read_samples(pickled))
        else:
            if not Path(data).exists():
                raise ConfigError(f"data {data!r} not found")
            self.problems = []
            for source, path, folder in problem_files(data, opts.scripts):
                self.problems += load_problems(read_rows(str(path)), folder, source=source,
                                               first_id=len(self.problems))
        pool = official_selection(self.problems, data) if self.select == "official" else [p.id for p in self.problems]
        self._ids = select_ids(pool, opts.ids, opts.limit)
        self.runs, self.max_rounds = opts.runs, opts.max_rounds
        self.command_timeout, self.max_new_tokens = opts.command_timeout, opts.max_new_tokens
        self.workers, self.chunk = opts.workers, opts.chunk
        self.memory_mb = int(opts.memory_mb if opts.memory_mb is not None else max(self.sandbox.memory_mb, 2048))

    def answer_signatures(self, requests: Sequence[Any], answers: Sequence[str]) -> list[str | None]:
        """The action each reply proposes for its turn (see :func:`action_signature`)."""
        return [action_signature(a) for a in answers]

    def _start(self, problem: OSProblem, session: OSSession | None = None) -> OSSession:
        """Session with the problem's init scripts run and its ``start`` command running."""
        session = session or OSSession(memory_mb=self.memory_mb, image=problem.image)
        try:
            for lang, code in problem.init:
                session.run_script(lang, code, [], timeout=60, view="machine")
            if problem.start is not None:
                session.run(problem.start[1], timeout=self.command_timeout)
        except BaseException:
            session.close()
            raise
        return session

    def _prompt(self) -> str:
        return OFFICIAL_PROMPT if self.protocol == "official" else PROMPT

    def _verdict(self, ep: OSEpisode) -> bool:
        """Officially every episode is judged, one that never answered with ``""``; AgentBench fails it."""
        if ep.committed:
            return judge(ep.problem, ep.answer, ep.session)
        return self.protocol == "official" and judge(ep.problem, "", ep.session)

    def _one_run(self, engine: Engine, chosen: list[str]) -> dict[str, tuple[float, str | None, dict]]:
        by_id = {p.id: p for p in self.problems}
        episodes: list[OSEpisode] = []
        out: dict[str, tuple[float, str | None, dict]] = {}

        sessions: dict[str, OSSession] = {}

        def build(i: str) -> None:
            try:
                sessions[i] = OSSession(memory_mb=self.memory_mb, launch=False, image=by_id[i].image)
            except Exception as e:  # a broken set-up is that sample's failure
                out[i] = (0.0, f"set-up failed: {error_text(e)}", {})

        def start(i: str) -> None:
            try:
                episodes.append(OSEpisode(by_id[i], self._start(by_id[i], sessions[i]), self.max_rounds,
                                          self.command_timeout, self._prompt(), self.protocol,
                                          by_id[i].extra.get("conversation") if self.protocol == "official" else None))
            except Exception as e:
                out[i] = (0.0, f"set-up failed: {error_text(e)}", {})

        # Layers are built in threads; shells start in this thread, which outlives them
        # (bubblewrap is killed when the thread that started it ends).
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            list(pool.map(build, chosen))
        for i in chosen:
            for attempt in range(2):  # a machine that did not start (a loaded host) is made once more
                if i not in sessions:
                    break
                try:
                    sessions[i].launch()
                    break
                except Exception as e:
                    sessions.pop(i).close()
                    if attempt == 0:
                        build(i)
                    else:
                        out[i] = (0.0, f"set-up failed: {error_text(e)}", {})
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            list(pool.map(start, [i for i in chosen if i in sessions]))
        try:
            overlong: dict[str, int] = {}
            errors = run_episodes(engine, episodes, max_new_tokens=self.max_new_tokens, workers=self.workers,
                                  overlong=overlong)

            def finish(ep: OSEpisode) -> None:
                detail = {"status": ep.status, "answer": ep.answer, "turns": ep.turn, "conversation": ep.messages}
                if overlong.get(ep.sample_id):  # prompts longer than the engine takes, answered ""
                    detail["overlong_prompts"] = overlong[ep.sample_id]
                try:
                    ok = self._verdict(ep)
                    if ep.session.timeouts:  # commands or checks cut at their limit
                        detail["timeouts"] = ep.session.timeouts
                    out[ep.sample_id] = (1.0 if ok else 0.0, errors.get(ep.sample_id), detail)
                except Exception as e:  # a judge that cannot run is a failed sample
                    out[ep.sample_id] = (0.0, f"judging failed: {error_text(e)}", detail)

            with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
                list(pool.map(finish, episodes))
        finally:
            for ep in episodes:
                ep.session.close()
        return out

    def _play(self, engine: Engine, chosen: list[str]) -> dict[str, tuple[float, str | None, dict]]:
        """One run over ``chosen``, ``chunk`` episodes at a time."""
        out: dict[str, tuple[float, str | None, dict]] = {}
        for k in range(0, len(chosen), self.chunk):
            out.update(self._one_run(engine, chosen[k:k + self.chunk]))
        return out

    def score(self, engine: Engine, chosen: list[str]) -> list[SampleResult]:
        """Play every chosen problem ``runs`` times; a sample's score is its pass rate over the runs."""
        runs = [self._play(engine, chosen) for _ in range(self.runs)]
        samples = []
        for i in chosen:
            scores = [r[i][0] for r in runs]
            errs = [r[i][1] for r in runs if r[i][1]]
            detail = {"runs": [r[i][2] for r in runs], "scores": scores}
            skipped = sum(r[i][2].get("overlong_prompts", 0) for r in runs)
            if skipped:
                detail["overlong_prompts"] = skipped
            samples.append(SampleResult(i, sum(scores) / len(scores), errs[0] if errs else None, detail))
        return samples
