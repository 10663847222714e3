"""CMA-ES operator control: the official formula (parents' normalised bins times the solver's ask),
the official fitness and tell, out-of-order children, and a replay of the run folder's log."""
from __future__ import annotations

import cma
import numpy as np
import pytest

from cycleqd.config import Bins, OperatorControlConfig
from cycleqd.search.archive import Archive
from cycleqd.search.operator_control import FILE, ControlStateError, OperatorControl

TASKS = ["os", "mbpp", "db"]
BINS = {"os": Bins(lo=0, hi=0.45, count=15), "mbpp": Bins(lo=0, hi=0.75, count=15), "db": Bins(lo=0, hi=0.45, count=10)}
CFG = OperatorControlConfig(popsize=8, sigma=0.01, seed=42)


def _official_solver(dim: int):
    """The official constructor (main.py L78-87) with its own RandomState(42) as the normal draws."""
    return cma.CMAEvolutionStrategy(x0=np.zeros(dim), sigma0=0.01, inopts={
        "popsize": 8, "seed": 42, "randn": np.random.RandomState(42).randn, "verbose": -9})


def _official_params(x, parent1, parent2, grid_sizes):
    """main.py L113-124, as written there."""
    input_data = np.array(parent1 + parent2) / np.tile(grid_sizes, 2)
    return np.dot(input_data, x.reshape((input_data.size, -1)))


def test_operator_parameters_follow_the_official_formula_for_the_asked_weights():
    """Each child of q takes the next candidate of q's population; (mu, sigma, rate) equal the official
    dot product of its parents' cells over the other tasks' grid sizes with that candidate as a matrix."""
    control = OperatorControl(CFG, Archive(TASKS, BINS))
    grid = [15, 10]  # archive "mbpp" spans os (15 bins) and db (10 bins)
    population = _official_solver(2 * 2 * 3).ask()
    rng = np.random.default_rng(0)
    for i in range(8):
        p1, p2 = [int(rng.integers(15)), int(rng.integers(10))], [int(rng.integers(15)), int(rng.integers(10))]
        got = control.ask(i, "mbpp", [tuple(p1), tuple(p2)])
        want = _official_params(np.asarray(population[i]), p1, p2, grid)
        assert got == pytest.approx(tuple(want), rel=1e-12, abs=1e-15)
    assert len(control.tasks["mbpp"].populations) == 1 and control.tasks["os"].populations == []
    # Hand-checked on a candidate of ones: each output is the sum of the normalised inputs.
    assert _official_params(np.ones(12), [3, 5], [15, 0], grid) == pytest.approx([0.2 + 0.5 + 1.0] * 3)


def test_fitness_is_quality_plus_normalised_bins_and_the_population_is_told_when_complete():
    """After popsize children the solver is told -(quality on q + own bins / grid sizes), in slot order:
    the next population equals an official solver's told the same values."""
    arch = Archive(TASKS, BINS)
    control = OperatorControl(CFG, arch)
    official = _official_solver(12)
    population = official.ask()
    scores = [{"os": 0.03 * i, "mbpp": 0.05 * i, "db": 0.04 * (8 - i)} for i in range(8)]
    for i in range(8):
        control.ask(i, "db", [(1, 2), (3, 4)])
    for i in reversed(range(8)):  # children come back out of order
        control.tell(i, scores[i])
    fitness = [scores[i]["db"] + arch.cell("db", scores[i])[0] / 15 + arch.cell("db", scores[i])[1] / 15
               for i in range(8)]
    official.tell(population, [-f for f in fitness])
    assert control.tasks["db"].populations == []
    nxt = control.ask(8, "db", [(1, 1), (2, 2)])
    assert nxt == pytest.approx(tuple(_official_params(np.asarray(official.ask()[0]), [1, 1], [2, 2], [15, 15])))


def test_more_children_than_popsize_in_flight_take_the_next_population():
    control = OperatorControl(OperatorControlConfig(popsize=4), Archive(TASKS, BINS))
    for i in range(6):
        control.ask(i, "os", [(0, 0), (1, 1)])
    ctl = control.tasks["os"]
    assert [p.number for p in ctl.populations] == [0, 1]
    for i in (4, 5, 1, 2, 3):
        control.tell(i, {"os": 0.1, "mbpp": 0.1, "db": 0.1})
    assert [p.number for p in ctl.populations] == [0, 1]  # population 0 waits for child 0
    control.tell(0, None)  # a failed child: fitness 0
    assert [p.number for p in ctl.populations] == [1]


def test_the_log_in_the_run_folder_replays_and_frees_lost_candidates(tmp_path):
    """A control rebuilt from the run folder continues exactly as the original; a candidate taken by a
    child that never came back is handed to the next child; a log from another seed is refused."""
    arch = Archive(TASKS, BINS)
    live = OperatorControl(CFG, arch, tmp_path)
    for i in range(11):
        live.ask(i, "os", [(i % 15, 2), (3, i % 10)])
    for i in range(9):
        live.tell(i, {"os": 0.01 * i, "mbpp": 0.02 * i, "db": 0.03})
    # children 9 and 10 are lost (the run was killed): their slots are free after a restart
    resumed = OperatorControl(CFG, arch, tmp_path)
    live_next = live.tasks["os"].populations[0].candidates
    assert np.array_equal(np.asarray(live_next), np.asarray(resumed.tasks["os"].populations[0].candidates))
    assert resumed.tasks["os"].populations[0].owner == {}
    assert resumed.ask(20, "os", [(1, 1), (1, 1)]) == pytest.approx(
        tuple(_official_params(live_next[1], [1, 1], [1, 1], [15, 10])))
    with open(tmp_path / FILE, "a") as f:
        f.write('{"event": "fitness", "task": "os", "popul')  # a line cut by a kill is dropped
    OperatorControl(CFG, arch, tmp_path)
    with pytest.raises(ControlStateError, match="does not replay"):
        OperatorControl(OperatorControlConfig(seed=7), arch, tmp_path)


def test_a_loop_with_cma_resumes_to_the_same_run(tiny_family, tmp_path):
    """In process (no Ray): a cma run stopped after 4 children and resumed to 8 logs the same children,
    operator parameters and solver events as a run straight to 8."""
    from cycleqd.atomic import write_atomic
    from cycleqd.config import dump_config, parse_config
    from cycleqd.evolve.loop import run_loop
    from cycleqd.evolve.pool import LocalPool
    from cycleqd.evolve.worker import ChildWorker
    from cycleqd.runs.folder import RunFolder
    from cycleqd.runs.store import RunStore

    tasks = []
    for t, text in {"a": "def f(x): return x + 1\n", "b": "select name from t\n", "c": "ls -la /tmp\n"}.items():
        (tmp_path / f"{t}.txt").write_text(text)
        tasks.append({"name": t, "kind": "likelihood", "data": str(tmp_path / f"{t}.txt"),
                      "bins": {"lo": 0.0150, "hi": 0.0165, "count": 6}})
    data = {"name": "cma", "seed": 5, "tasks": tasks, "engine": {"device": "cpu"},
            "models": {"base": str(tiny_family["base"]), "experts": {t: str(tiny_family[t]) for t in "abc"}},
            "evolution": {"generations": 8, "workers": 1, "final_merge": False,
                          "operator_control": {"name": "cma", "popsize": 2}},
            "prepare_cache": str(tmp_path / "cache")}
    worker = ChildWorker(parse_config(data), threads=1)

    def loop(run, generations):
        cfg = parse_config({**data, "evolution": {**data["evolution"], "generations": generations}})
        if not (run / "config.yaml").exists():
            RunStore.create(run, cfg)
        write_atomic(run / "config.yaml", dump_config(cfg))
        worker.cfg = cfg
        return run_loop(RunStore(run), LocalPool([worker]))

    loop(tmp_path / "straight", 8)
    loop(tmp_path / "split", 4)
    loop(tmp_path / "split", 8)
    a, b = RunFolder(tmp_path / "straight"), RunFolder(tmp_path / "split")
    assert [c.operators for c in a.children] == [c.operators for c in b.children]
    assert all(c.operators is not None for c in a.children) and len(a.children) == 8
    assert (tmp_path / "straight" / FILE).read_text() == (tmp_path / "split" / FILE).read_text()
    assert '"event": "tell"' in (tmp_path / "split" / FILE).read_text()
