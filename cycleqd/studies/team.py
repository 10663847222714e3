"""Teams of archive elites: a router, an execution vote, a mixture of agents.

A team is a few genomes of a run's archives, chosen only on the scores the run
already has (no candidate is evaluated again to pick it). All members share one
resident engine with the base and the factors: a member is materialised into it
(``load_weights``, in place) when its turn comes, so a team of k costs k genomes of
memory (a few MB each, not k models) and one materialisation per switch of member.
With LoRA experts the members are adapters of that one engine instead (:class:`Residents`):
no weights switch, and the members' answers to a request share one batch.
:class:`TeamEngine` implements the Engine protocol, so every task evaluates a team
unchanged; per task and strategy (the *variants*):

- ``router_task``: every request of task t goes to the best elite of archive t (by t's quality).
- ``router_nll``: task-agnostic; every request goes to the router member (the best
  elite of each archive) with the lowest mean negative log-likelihood of its prompt.
- ``vote``: the k best elites of archive t (distinct cells) each answer; answers are
  grouped by the task's signatures (:class:`cycleqd.tasks.protocol.Votable`: the execution
  result, or for multi-turn tasks the action proposed this turn); the largest group wins,
  a tie goes to the group holding the better member (quality on t), whose answer is used.
- ``moa``: the k best elites of archive t propose, the best of them aggregates: it gets
  the proposals in its prompt (:func:`with_proposals`) and writes the final answer, after
  ``layers`` rounds of proposals (each round's proposers see the previous round's).

    team = choose_team(RunFolder(run).snapshot(), "vote", size=3)
    engine = TeamEngine(Residents(worker.engine, worker.factors, genomes), team, "code", "vote", task)
    task.evaluate(engine)
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from cycleqd.config import ConfigError
from cycleqd.engine.protocol import Engine, EngineUnsupported, GenRequest
from cycleqd.tasks.protocol import text_signatures

__all__ = ["STRATEGIES", "VARIANTS", "Member", "Team", "Residents", "MemberView", "TeamEngine", "choose_team", "vote",
           "with_proposals", "evaluate_team", "make_team", "read_team"]

#: strategy -> the variants it evaluates (a router reports the task-labelled and the NLL router).
STRATEGIES: dict[str, tuple[str, ...]] = {"router": ("router_task", "router_nll"), "vote": ("vote",),
                                          "moa": ("moa",)}
VARIANTS = tuple(v for vs in STRATEGIES.values() for v in vs)
TEAM_FILE = "team.json"


@dataclass(frozen=True)
class Member:
    """One team member: an elite's genome, the archive cells holding it, its scores in the run."""

    genome: str
    cells: dict[str, tuple[int, ...]]
    scores: dict[str, float]


@dataclass(frozen=True)
class Team:
    """Members and who does what on each task.

    ``plan[task]`` holds ``router`` (the best elite of that task's archive) and, for a vote or
    a mixture, ``voters`` (its ``size`` best elites, best first: the vote's voters and the
    mixture's proposers; the first is the mixture's aggregator). ``routers`` are the distinct
    router members in task order: the candidates of the NLL router.
    """

    strategy: str
    size: int
    layers: int
    tasks: tuple[str, ...]
    members: tuple[Member, ...]
    plan: dict[str, dict[str, Any]]

    @property
    def variants(self) -> tuple[str, ...]:
        return STRATEGIES[self.strategy]

    @property
    def routers(self) -> list[str]:
        return list(dict.fromkeys(self.plan[t]["router"] for t in self.tasks))

    def member(self, genome: str) -> Member:
        return next(m for m in self.members if m.genome == genome)

    def used(self, variant: str) -> list[str]:
        """The genomes a variant uses (router: the routers; vote and moa: every task's voters)."""
        if variant.startswith("router"):
            return self.routers
        return list(dict.fromkeys(g for t in self.tasks for g in self.plan[t]["voters"]))

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "size": self.size, "layers": self.layers, "tasks": list(self.tasks),
                "variants": list(self.variants),
                "members": [{"genome": m.genome, "cells": {a: list(c) for a, c in m.cells.items()},
                             "scores": m.scores} for m in self.members],
                "plan": self.plan}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Team":
        """The team of a team.json object. Raises ConfigError for one that is not a team."""
        try:
            members = tuple(Member(m["genome"], {a: tuple(c) for a, c in m["cells"].items()},
                                   {t: float(s) for t, s in m["scores"].items()}) for m in data["members"])
            team = cls(str(data["strategy"]), int(data["size"]), int(data.get("layers", 1)), tuple(data["tasks"]),
                       members, {t: dict(p) for t, p in data["plan"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"not a team description ({type(e).__name__}: {e})") from None
        if team.strategy not in STRATEGIES:
            raise ConfigError(f"team strategy {team.strategy!r} is not one of {', '.join(STRATEGIES)}")
        known = {m.genome for m in members}
        for t in team.tasks:
            p = team.plan.get(t, {})
            named = [p.get("router")] + list(p.get("voters") or ([] if team.strategy == "router" else [None]))
            if not all(g in known for g in named):
                raise ConfigError(f"not a team description (the plan of task {t!r} names no member or an unknown one)")
        return team


def choose_team(snap: Any, strategy: str, size: int = 3, layers: int = 1) -> Team:
    """The team of ``strategy`` from an :class:`~cycleqd.runs.folder.ArchiveSnapshot`, on its scores alone.

    Raises:
        ConfigError: unknown strategy, ``size`` or ``layers`` < 1, or an empty archive.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if size < 1 or layers < 1:
        raise ConfigError(f"--size and --layers must be >= 1, got {size} and {layers}")
    plan: dict[str, dict[str, Any]] = {}
    for t in snap.tasks:
        ranked = sorted(snap.archives[t]["elites"], key=lambda e: (-float(e["quality"]), e["genome"]))
        if not ranked:
            raise ConfigError(f"archive {t!r} has no elites to make a team of")
        plan[t] = {"router": ranked[0]["genome"]}
        if strategy != "router":
            plan[t]["voters"] = [e["genome"] for e in ranked[:size]]
    cells: dict[str, dict[str, tuple[int, ...]]] = {}
    scores: dict[str, dict[str, float]] = {}
    for t in snap.tasks:
        for e in snap.archives[t]["elites"]:
            cells.setdefault(e["genome"], {})[t] = tuple(e["cell"])
            scores[e["genome"]] = {k: float(v) for k, v in e["scores"].items()}
    team = Team(strategy, size, layers, tuple(snap.tasks), (), plan)
    used = list(dict.fromkeys(g for v in team.variants for g in team.used(v)))
    return replace(team, members=tuple(Member(g, cells[g], scores[g]) for g in used))


class Residents:
    """The team's members over one resident engine: each member served as an adapter, or materialised in turn.

    With LoRA experts, an engine that serves adapters (:meth:`~cycleqd.engine.protocol.Engine.serves_adapters`)
    and members that are low rank, every member is held as a LoRA adapter beside the base
    (``as_adapters``): members answer in shared batches (:meth:`generate_routed`) and no weights
    are switched. Otherwise a member is materialised into the engine (``load_genome``, in place)
    when its turn comes. Counts the switches and their seconds (``switches``, ``seconds``, adapter
    loads included); loading the member already in the engine is free. ``engines`` adds members
    that bring their own engine (e.g. a :class:`~cycleqd.engine.answers.ReplayEngine` of a model's
    recorded answers). ``adapters=False`` forces weight switches.
    """

    def __init__(self, engine: Any, factors: Any, genomes: Mapping[str, Any],
                 engines: Mapping[str, Any] | None = None, *, adapters: bool | None = None):
        self.engine, self.factors, self.genomes = engine, factors, dict(genomes)
        self.engines = dict(engines or {})
        self.current: str | None = None
        self.switches, self.seconds = 0, 0.0
        able = _adaptable(engine, factors, [g for n, g in self.genomes.items() if n not in self.engines])
        self.as_adapters = able if adapters is None else (adapters and able)
        self._held: set[str] = set()

    def _hold(self, genome: str) -> None:
        if genome in self._held:
            return
        from cycleqd.model.lora import child_adapter

        t0 = time.perf_counter()
        self.engine.load_adapter(genome, child_adapter(self.genomes[genome], self.factors, shared=True))
        self._held.add(genome)
        self.seconds += time.perf_counter() - t0

    def load(self, genome: str) -> Any:
        """The engine answering as ``genome``: its adapter's view, or the engine with ``genome`` materialised."""
        if genome in self.engines:
            return self.engines[genome]
        if self.as_adapters:
            self._hold(genome)
            return MemberView(self.engine, genome)
        if genome != self.current:
            import torch

            t0 = time.perf_counter()
            self.current = None  # a failed load leaves no member named as loaded
            with torch.no_grad():
                self.engine.load_genome(self.genomes[genome], self.factors)
            self.current = genome
            self.switches += 1
            self.seconds += time.perf_counter() - t0
        return self.engine

    def generate(self, genome: str, requests: Sequence[GenRequest]) -> list[str]:
        return self.load(genome).generate(requests) if requests else []

    def generate_routed(self, genomes: Sequence[str], requests: Sequence[GenRequest]) -> list[str]:
        """Request i answered by member ``genomes[i]``: one shared batch for the adapter members,
        one call per member otherwise (the loaded member first)."""
        out = [""] * len(requests)
        shared = [i for i, g in enumerate(genomes) if self.as_adapters and g not in self.engines]
        for g in dict.fromkeys(genomes[i] for i in shared):
            self._hold(g)
        if shared:
            for i, text in zip(shared, self.engine.generate_with([requests[i] for i in shared],
                                                                 [genomes[i] for i in shared])):
                out[i] = text
        rest = [i for i in range(len(requests)) if i not in set(shared)]
        for g in self.first(list(dict.fromkeys(genomes[i] for i in rest))):
            idx = [i for i in rest if genomes[i] == g]
            for i, text in zip(idx, self.generate(g, [requests[i] for i in idx])):
                out[i] = text
        return out

    def prompt_nll(self, genome: str, requests: Sequence[GenRequest]) -> list[float]:
        """Mean negative log-likelihood per prompt token of each request under ``genome``.

        Raises:
            ConfigError: the engine cannot score prompts (only the transformers engine can).
        """
        try:
            engine = self.load(genome)
            scored = engine.prompt_logprobs(requests)
        except EngineUnsupported as e:
            raise ConfigError(f"the NLL router needs an engine that scores prompts (transformers): {e}") from None
        return [-s / n if n else math.inf for s, n in scored]

    def first(self, genomes: Sequence[str]) -> list[str]:
        """``genomes`` with the loaded one first (one switch fewer)."""
        return sorted(genomes, key=lambda g: g != self.current)


def _adaptable(engine: Any, factors: Any, genomes: Sequence[Any]) -> bool:
    """Whether members can be served as adapters: LoRA factors, low-rank genomes, an engine that serves them."""
    if engine is None or not getattr(factors, "low_rank", False) or any(getattr(g, "terms", ()) for g in genomes):
        return False
    try:
        return bool(engine.serves_adapters())
    except AttributeError:
        return False


class MemberView(Engine):
    """One member of a team served as an adapter of a shared engine: it generates and scores prompts
    through its adapter; everything else a task reads (``tokenizer`` ...) is the engine's."""

    def __init__(self, engine: Engine, name: str):
        self._engine, self._name = engine, name
        self.device, self.dtype = engine.device, engine.dtype

    def __getattr__(self, attr: str) -> Any:
        # Only what the Engine protocol does not define: scoring other than prompts and weight loads
        # stay the protocol's "unsupported", never the base's answers.
        return getattr(self._engine, attr)

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        return self._engine.generate_with(list(requests), [self._name] * len(requests)) if requests else []

    def prompt_logprobs(self, requests: Sequence[GenRequest], batch_size: int = 16) -> list[tuple[float, int]]:
        return self._engine.prompt_logprobs_with(requests, self._name, batch_size)


def vote(signatures: Sequence[str | None], quality: Sequence[float]) -> int:
    """The index of the member whose answer wins: the largest group of equal signatures, ties
    broken by the best member quality in the group; within it, the best member (first on ties).
    Answers without a signature (``None``) form no group; if none has one, the best member wins."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(signatures):
        if s is not None:
            groups.setdefault(s, []).append(i)
    if not groups:
        return max(range(len(quality)), key=lambda i: (quality[i], -i))
    best = max(groups.values(), key=lambda g: (len(g), max(quality[i] for i in g), -g[0]))
    return max(best, key=lambda i: (quality[i], -i))


def with_proposals(req: GenRequest, proposals: Sequence[str]) -> GenRequest:
    """The aggregator's request: ``req`` with the proposed answers in its prompt.

    A raw prompt (the mini tasks: the answer is the next line) gets the proposals as lines
    before it; chat messages get them at the end of the last user turn, numbered, with an
    instruction to write one reply in the task's format.
    """
    if req.prompt is not None:
        lines = "".join(f"proposal {i}: {p.strip()}\n" for i, p in enumerate(proposals, 1))
        return replace(req, prompt=lines + req.prompt)
    listed = "\n\n".join(f"[{i}] {p.strip()}" for i, p in enumerate(proposals, 1))
    text = (f"\n\nReplies that other models proposed for this turn (some may be wrong):\n\n{listed}\n\n"
            "Write the single best reply, in exactly the format asked for above.")
    messages = [dict(m) for m in req.messages or ()]
    if messages and messages[-1].get("role") == "user":
        messages[-1]["content"] = messages[-1]["content"] + text
    else:
        messages.append({"role": "user", "content": text.strip()})
    return replace(req, messages=tuple(messages))


def _resident_bytes(engine: Engine) -> int | None:
    try:
        return int(engine.resident_bytes())
    except EngineUnsupported:
        return None


class TeamEngine(Engine):
    """A team as one Engine for one task: routes, votes or aggregates across its members.

    Args:
        residents: the members over the resident engine.
        team: the team (its plan says who answers ``task_name``).
        task_name: the task this engine serves (its archive is the members' niche).
        variant: one of :data:`VARIANTS`.
        task: the task object, for its ``answer_signatures`` (vote); without it, votes group
            equal answer texts.

    ``trace`` holds one record per request: who answered, what each member said, who won.
    """

    def __init__(self, residents: Residents, team: Team, task_name: str, variant: str, task: Any = None):
        if variant not in VARIANTS:
            raise ConfigError(f"team variant {variant!r} is not one of {', '.join(VARIANTS)}")
        self.residents, self.team, self.task_name, self.variant, self.task = residents, team, task_name, variant, task
        some = residents.engine if residents.engine is not None else next(iter(residents.engines.values()))
        self.device, self.dtype = some.device, some.dtype
        self.plan = team.plan[task_name]
        if variant in ("vote", "moa") and not self.plan.get("voters"):
            raise ConfigError(f"a {team.strategy} team has no voters for {variant} (make a {variant} team)")
        self.trace: list[dict[str, Any]] = []

    def load_weights(self, weights: Any) -> None:
        raise TypeError("a team takes no weights: its members are genomes materialised in turn")

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """One answer per request, by the engine's variant (see the module docstring)."""
        requests = list(requests)
        if not requests:
            return []
        return {"router_task": self._router_task, "router_nll": self._router_nll, "vote": self._vote,
                "moa": self._moa}[self.variant](requests)

    def _quality(self, genome: str) -> float:
        return float(self.team.member(genome).scores.get(self.task_name, 0.0))

    def _signatures(self, requests: Sequence[GenRequest], answers: Sequence[str]) -> list[str | None]:
        return list(self.task.answer_signatures(requests, answers)) if self.task else text_signatures(answers)

    def _router_task(self, requests: list[GenRequest]) -> list[str]:
        genome = self.plan["router"]
        self.trace += [{"sample_id": r.sample_id, "turn": r.turn, "member": genome} for r in requests]
        return self.residents.generate(genome, requests)

    def _router_nll(self, requests: list[GenRequest]) -> list[str]:
        candidates = self.team.routers
        nll = {g: self.residents.prompt_nll(g, requests) for g in self.residents.first(candidates)}
        chosen = [min(candidates, key=lambda g: (nll[g][i], candidates.index(g))) for i in range(len(requests))]
        out = self.residents.generate_routed(chosen, requests)
        self.trace += [{"sample_id": r.sample_id, "turn": r.turn, "member": chosen[i],
                        "nll": {g: nll[g][i] for g in candidates}} for i, r in enumerate(requests)]
        return out

    def _answers(self, genomes: Sequence[str], requests: list[GenRequest]) -> dict[str, list[str]]:
        order = self.residents.first(genomes)
        flat = self.residents.generate_routed([g for g in order for _ in requests], [r for _ in order for r in requests])
        n = len(requests)
        return {g: flat[k * n : (k + 1) * n] for k, g in enumerate(order)}

    def _vote(self, requests: list[GenRequest]) -> list[str]:
        voters = list(self.plan["voters"])
        answers = self._answers(voters, requests)
        sigs = {g: self._signatures(requests, answers[g]) for g in voters}
        quality = [self._quality(g) for g in voters]
        out = []
        for i, r in enumerate(requests):
            w = voters[vote([sigs[g][i] for g in voters], quality)]
            out.append(answers[w][i])
            self.trace.append({"sample_id": r.sample_id, "turn": r.turn, "member": w,
                               "answers": {g: answers[g][i] for g in voters},
                               "signatures": {g: sigs[g][i] for g in voters},
                               "group": [g for g in voters if sigs[g][i] is not None and sigs[g][i] == sigs[w][i]]})
        return out

    def _moa(self, requests: list[GenRequest]) -> list[str]:
        proposers, aggregator = list(self.plan["voters"]), self.plan["voters"][0]
        current = requests
        rounds = []
        for _ in range(self.team.layers):
            answers = self._answers(proposers, current)
            rounds.append(answers)
            current = [with_proposals(r, [answers[g][i] for g in proposers]) for i, r in enumerate(requests)]
        out = self.residents.generate(aggregator, current)
        for i, r in enumerate(requests):
            final = current[i]
            self.trace.append({"sample_id": r.sample_id, "turn": r.turn, "member": aggregator,
                               "proposals": [{g: a[g][i] for g in proposers} for a in rounds],
                               "aggregator_prompt": final.prompt if final.prompt is not None
                               else final.messages[-1]["content"], "answer": out[i]})
        return out


def evaluate_team(team: Team, residents: Residents, tasks: Mapping[str, Any], variants: Sequence[str] | None = None,
                  *, progress: bool = False) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, TeamEngine]]]:
    """Every variant of the team on every task: ({variant: {task: TaskResult}}, the engines with their traces)."""
    from tqdm.auto import tqdm

    variants = list(variants or team.variants)
    results: dict[str, dict[str, Any]] = {v: {} for v in variants}
    engines: dict[str, dict[str, TeamEngine]] = {v: {} for v in variants}
    bar = tqdm(total=len(variants) * len(tasks), desc="team", disable=not progress, leave=False)
    for v in variants:
        for name, task in tasks.items():
            bar.set_postfix_str(f"{v} {name}")
            engines[v][name] = TeamEngine(residents, team, name, v, task)
            results[v][name] = task.evaluate(engines[v][name])
            bar.update(1)
    bar.close()
    return results, engines


def read_team(path: str | Path) -> Team:
    """The team of a team.json file (or of the folder holding one). Raises ConfigError."""
    p = Path(path)
    p = p / TEAM_FILE if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"--team {str(path)!r}: no such file (`cycleqd team RUN --strategy ...` writes team.json)")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: not a team description (not a JSON object)")
    return Team.from_json(data)


def _routing(engines: Mapping[str, TeamEngine]) -> dict[str, dict[str, int]]:
    """task -> {member: requests it answered}."""
    out: dict[str, dict[str, int]] = {}
    for name, e in engines.items():
        for rec in e.trace:
            out.setdefault(name, {}).setdefault(rec["member"], 0)
            out[name][rec["member"]] += 1
    return out


def make_team(run_dir: str | Path, strategy: str, *, size: int = 3, layers: int = 1, out: str | Path | None = None,
              split: str | None = None, n: int | None = None, seed: int | None = None,
              progress: bool = True) -> Path:
    """Choose a team from a run's archives, evaluate it and the best single elite, write ``out/team.json``.

    The team and the run's best elite (best mean over the tasks) are scored in the same
    call, with the run's own tasks, engine and sandbox; ``split`` (with ``n`` items and the
    draw ``seed``) scores them on other items of the tasks (e.g. the mini tasks' test split).
    ``out`` (default RUN/teams/<strategy>) gets ``team.json`` and ``genomes/`` (the members').

    Raises:
        ConfigError: bad input (no run, unknown strategy, ``out`` not empty, a split the
            tasks do not take), before anything is loaded or written.
    """
    import torch

    from cycleqd.atomic import write_atomic
    from cycleqd.runs.folder import RunFolder, best_by_mean

    run = RunFolder(run_dir)
    snap = run.snapshot()
    team = choose_team(snap, strategy, size, layers)
    ranked = best_by_mean(snap)
    if not ranked:
        raise ConfigError(f"run {str(run_dir)!r} has no elites")
    best = ranked[0]
    out = Path(out) if out is not None else run.path / "teams" / strategy
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not an empty folder")
    from cycleqd.evolve.worker import ChildWorker, ready_config

    cfg = ready_config(run.config, split=split, n=n, seed=seed)
    for m in team.members:
        run.store.check_genome(m.genome)
    t0 = time.perf_counter()
    worker = ChildWorker(cfg, threads=torch.get_num_threads())
    load_seconds = time.perf_counter() - t0
    genomes = {g: run.store.load_genome(g) for g in [m.genome for m in team.members] + [best["genome"]]}
    residents = Residents(worker.engine, worker.factors, genomes)
    t0 = time.perf_counter()
    results, engines = evaluate_team(team, residents, worker.tasks, progress=progress)
    team_seconds = time.perf_counter() - t0
    single = {name: task.evaluate(residents.load(best["genome"])) for name, task in worker.tasks.items()}

    def scores(res: Mapping[str, Any]) -> dict[str, float]:
        q = {t: float(r.quality) for t, r in res.items()}
        return {**q, "mean": sum(q.values()) / len(q)}

    genome_bytes = {g: run.store.genome_path(g).stat().st_size for g in genomes}
    record = {
        "run": str(run.path.resolve()), "generation": snap.generation, **team.to_json(),
        "split": {"split": split or "as in the run", "n": n, "seed": seed},
        "scores": {v: scores(results[v]) for v in results},
        "best_single": {"genome": best["genome"], "scores": scores(single), "run_scores": best["scores"]},
        "routing": {v: _routing(engines[v]) for v in engines if v.startswith("router")},
        "cost": {"members_as": "adapters" if residents.as_adapters else "weights",
                 "switches": residents.switches, "materialize_seconds": round(residents.seconds, 3),
                 "seconds_per_switch": round(residents.seconds / max(1, residents.switches), 4),
                 "team_seconds": round(team_seconds, 2), "engine_load_seconds": round(load_seconds, 2),
                 "resident_model_bytes": _resident_bytes(worker.engine),
                 "member_genome_bytes": sum(genome_bytes[m.genome] for m in team.members)},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "genomes").mkdir(exist_ok=True)
    for m in team.members:
        shutil.copyfile(run.store.genome_path(m.genome), out / "genomes" / f"{m.genome}.safetensors")
    write_atomic(out / TEAM_FILE, json.dumps(record, indent=1))
    return out


def format_team(record: Mapping[str, Any]) -> str:
    """team.json's scores as a small table: each variant beside the best single elite."""
    tasks = list(record["tasks"])
    head = f"{'model':24s}" + "".join(f"{t:>10s}" for t in tasks) + f"{'mean':>10s}"
    rows = [head, "-" * len(head)]
    named = [(f"team {v}", s) for v, s in record["scores"].items()]
    named.append((f"best elite {record['best_single']['genome']}", record["best_single"]["scores"]))
    for name, s in named:
        rows.append(f"{name:24s}" + "".join(f"{s[t]:10.3f}" for t in tasks) + f"{s['mean']:10.3f}")
    c = record["cost"]
    if c.get("members_as") == "adapters":
        rows.append(f"\n{len(record['members'])} members, served as LoRA adapters of one engine (no weight switch)")
    else:
        rows.append(f"\n{len(record['members'])} members, {c['switches']} switches, "
                    f"{c['seconds_per_switch']:.3f}s per switch")
    return "\n".join(rows)
