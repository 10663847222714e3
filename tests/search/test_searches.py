"""The coefficient searches (cma_es, nsga2, random) behind the scheduler's ask/tell protocol:
order guarded, bounds kept, and a search rebuilt from a log mid-run asks what the first one did."""
from __future__ import annotations

import numpy as np
import pytest

from cycleqd.config import ConfigError, parse_config
from cycleqd.registry import SEARCHES
from cycleqd.search.child import ChildResult
from cycleqd.search.scheduler import OrderError
from cycleqd.search.space import CoefficientSpace, SpaceOptions, slot_map

TASKS = ("a", "b", "c")
NAMES = sorted(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
               + [f"model.layers.{i}.{w}" for i in range(4) for w in ("mlp.up.weight", "self_attn.q.weight")])
SEARCH_NAMES = ["cma_es", "nsga2", "random"]


def config(search: str, generations: int = 40, **options):
    return parse_config({
        "seed": 7,
        "models": {"base": "base", "experts": {t: t for t in TASKS}},
        "tasks": [{"name": t, "kind": "likelihood"} for t in TASKS],
        "evolution": {"generations": generations, "workers": 2, "search": {"name": search, "options": options}},
    })


def make(cfg, log=()):
    cls = SEARCHES.get(cfg.evolution.search.name)
    opts = cls.parse_options(cfg)
    return cls(cfg, None, log, space=CoefficientSpace.over(NAMES, len(TASKS), opts))


def scores_of(x: tuple[float, ...]) -> dict[str, float]:
    """A smooth, deterministic stand-in for the K task qualities of a point (each task likes another expert)."""
    g = np.asarray(x).reshape(-1, len(TASKS))
    return {t: float(np.clip(1 - np.mean((g - np.eye(len(TASKS))[k]) ** 2), 0, 1)) for k, t in enumerate(TASKS)}


def drive(sched, *, workers: int = 2, stop_after: int | None = None, seed: int = 0, fail: set[int] = frozenset()):
    """Run ``sched`` with ``workers`` children in flight, finishing them in a random order.

    Returns (asked specs in ask order, log records, specs in flight when stopped).
    """
    rng = np.random.default_rng(seed)
    asked, log, flying = [], [], []
    while not sched.done():
        while sched.wants_more() and len(flying) < workers:
            spec = sched.ask()
            asked.append(spec)
            flying.append(spec)
        spec = flying.pop(int(rng.integers(len(flying))))
        err = "boom" if spec.index in fail else None
        res = ChildResult(spec.id, b"", {} if err else scores_of(spec.coefficients), error=err)
        log.append(sched.tell(spec, res))
        if stop_after is not None and len(log) >= stop_after:
            break
    return asked, log, flying


@pytest.mark.parametrize("search", SEARCH_NAMES)
def test_ask_tell_order_is_guarded(search):
    """Telling a spec twice, one never asked, or another child's result raises OrderError."""
    sched = make(config(search, population=4) if search != "random" else config(search))
    s1, s2 = sched.ask(), sched.ask()
    assert s1.index == 0 and s2.index == 1 and s1.id == "g000001" and s1.parents == ()
    assert sched.in_flight == 2
    with pytest.raises(OrderError, match="another|result of"):
        sched.tell(s1, ChildResult(s2.id, b"", scores_of(s2.coefficients)))
    rec = sched.tell(s1, ChildResult(s1.id, b"", scores_of(s1.coefficients)))
    assert rec.generation == 1 and rec.index == 0 and rec.quality_task == search and sched.in_flight == 1
    with pytest.raises(OrderError, match="told already"):
        sched.tell(s1, ChildResult(s1.id, b"", scores_of(s1.coefficients)))
    fresh = make(sched.cfg)
    with pytest.raises(OrderError, match="never asked"):
        fresh.tell(s2, ChildResult(s2.id, b"", scores_of(s2.coefficients)))


@pytest.mark.parametrize("search", ["cma_es", "nsga2"])
def test_a_batch_is_learnt_whole_and_waited_for(search):
    """A population search asks one batch, then waits (wants_more False, ask refused) until all of it is told."""
    sched = make(config(search, population=4))
    batch = [sched.ask() for _ in range(4)]
    assert not sched.wants_more()
    with pytest.raises(OrderError, match="told before more"):
        sched.ask()
    for spec in reversed(batch[1:]):  # out of order
        sched.tell(spec, ChildResult(spec.id, b"", scores_of(spec.coefficients)))
    assert not sched.wants_more() and sched.batches == 0
    sched.tell(batch[0], ChildResult(batch[0].id, b"", scores_of(batch[0].coefficients)))
    assert sched.batches == 1 and sched.wants_more() and sched.ask().index == 4


@pytest.mark.parametrize("search", SEARCH_NAMES)
@pytest.mark.parametrize("stop_after", [5, 13])
def test_resume_from_the_log_asks_the_same_children(search, stop_after):
    """A search rebuilt from the log of a run stopped mid-batch asks again the children that were in
    flight (same index, id, point), then the same points the uninterrupted run asked, whatever order
    children finish in; failed children are learnt from as scoring 0."""
    opts = {} if search == "random" else {"population": 6}
    cfg = config(search, 30, **opts)
    full, _, _ = drive(make(cfg), seed=1, fail={3})
    _, log, flying = drive(make(cfg), seed=2, stop_after=stop_after, fail={3})
    resumed = make(cfg, log)
    assert resumed.generation == stop_after
    again, log2, _ = drive(resumed, seed=3, fail={3})
    by_index = {s.index: s for s in full}
    assert sorted(s.index for s in flying) == [s.index for s in again[:len(flying)]]  # the lost ones first
    for s in again:
        assert s == by_index[s.index], f"{search}: child {s.index} differs after resume"
    indices = [r.index for r in log + log2]
    assert sorted(indices) == sorted(by_index) and len(set(indices)) == len(indices) == 30  # nothing lost or twice


@pytest.mark.parametrize("search", SEARCH_NAMES)
def test_every_point_stays_in_the_bounds(search):
    """Coefficients stay in a box the optimizer would leave (wide steps, a narrow box off zero)."""
    opts = {"bounds": [-0.25, 0.5], "granularity": "layer"}
    if search == "cma_es":
        opts.update(sigma0=3.0, population=5)
    if search == "nsga2":
        opts.update(population=6)
    sched = make(config(search, 40, **opts))
    asked, _, _ = drive(sched)
    if search == "cma_es":  # the state file's mean is a point of the box too
        assert -0.25 <= min(sched.search_state()["mean"]) and max(sched.search_state()["mean"]) <= 0.5
    pts = np.array([s.coefficients for s in asked])
    assert pts.shape == (40, 5 * 3)  # 4 layers + the rest, 3 experts
    assert pts.min() >= -0.25 and pts.max() <= 0.5
    assert pts.std() > 0.01  # they do move


def test_cma_es_weights_steer_the_fitness():
    """With weights on one task, CMA-ES's fitness is that task's quality, and its best follows it."""
    sched = make(config("cma_es", 36, population=6, weights={"a": 1.0}))
    drive(sched)
    assert sched.fitness(np.array([0.3, 0.9, 0.9])) == pytest.approx(0.3)
    assert sched.search_state()["weights"] == {"a": 1.0, "b": 0.0, "c": 0.0}


def test_nsga2_keeps_the_pareto_front():
    """nsga2's state holds the non-dominated children of all told: none dominates another, every
    other told child is dominated by one of them."""
    sched = make(config("nsga2", 24, population=6))
    _, log, _ = drive(sched)
    front = sched.search_state()["front"]
    pts = {f["genome"]: np.array([f["scores"][t] for t in TASKS]) for f in front}
    assert front and all(not (np.all(p >= q) and np.any(p > q)) for p in pts.values() for q in pts.values())
    for r in log:
        if r.id not in pts:
            q = np.array([r.scores[t] for t in TASKS])
            assert any(np.all(p >= q) and np.any(p > q) for p in pts.values()), r.id


def test_slots_by_granularity():
    """tensor: one slot each; layer: one per layer plus one for the rest; layer_group: layers pooled."""
    assert slot_map(NAMES, "tensor") == (list(range(len(NAMES))), len(NAMES))
    slots, n = slot_map(NAMES, "layer")
    assert n == 5 and slots[NAMES.index("model.layers.3.mlp.up.weight")] == 3
    assert slots[NAMES.index("lm_head.weight")] == slots[NAMES.index("model.norm.weight")] == 4
    slots, n = slot_map(NAMES, "layer_group", 3)
    assert n == 3 and [slots[NAMES.index(f"model.layers.{i}.mlp.up.weight")] for i in range(4)] == [0, 0, 0, 1]


@pytest.mark.parametrize("search, options, message", [
    ("cma-es", {}, "did you mean 'cma_es'"),
    ("cma_es", {"sigma": 0.3}, "did you mean 'sigma0'"),
    ("nsga2", {"bounds": [1.0, 0.0]}, "lo < hi"),
    ("cma_es", {"weights": {"x": 1.0}}, "weights name tasks"),
    ("random", {"granularity": "block"}, "granularity"),
    ("cycleqd", {"population": 3}, "takes no options"),
])
def test_bad_search_options_are_bad_input(search, options, message):
    """The search's name and options are checked with the config, in one line, before anything loads."""
    with pytest.raises(ConfigError, match=message):
        config(search, **options)


def test_cycleqd_stays_the_default():
    """Without evolution.search the CycleQD scheduler runs; `search: nsga2` is short for {name: nsga2}."""
    from cycleqd.search.scheduler import Scheduler

    cfg = config("cycleqd")
    assert cfg.evolution.search.name == "cycleqd" and SEARCHES.get("cycleqd") is Scheduler
    data = cfg.model_dump()
    data["evolution"]["search"] = "nsga2"
    assert parse_config(data).evolution.search.name == "nsga2"
    assert SpaceOptions().granularity == "layer_group"
