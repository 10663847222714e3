"""`kind: synthetic`: a smooth, deterministic function of the genome, scored with no model loaded."""
from __future__ import annotations

import time

import pytest
import torch

from cycleqd.config import ConfigError, parse_config
from cycleqd.engine.genome_only import GenomeOnlyEngine
from cycleqd.engine.protocol import EngineUnsupported
from cycleqd.evolve.worker import ChildWorker, genome_only
from cycleqd.model.genome import Genome
from cycleqd.search.child import ChildSpec
from cycleqd.tasks.synthetic import Synthetic, synthetic_quality


def _cfg(tiny_family, tmp_path, kinds=("synthetic",) * 3, latency=0.0) -> dict:
    tasks = []
    for k, (t, kind) in enumerate(zip("abc", kinds)):
        if kind == "synthetic":
            tasks.append({"name": t, "kind": kind, "options": {"expert": k, "latency_s": latency}})
        else:
            p = tmp_path / f"{t}.txt"
            p.write_text("abc\n")
            tasks.append({"name": t, "kind": kind, "data": str(p)})
    return {"name": "syn", "models": {"base": str(tiny_family["base"]),
                                      "experts": {t: str(tiny_family[t]) for t in "abc"}},
            "tasks": tasks, "evolution": {"generations": 2, "workers": 1},
            "prepare_cache": str(tmp_path / "cache")}


def test_quality_is_smooth_deterministic_and_peaks_at_a_merge():
    """Seeds score highest on their own skill, a blend scores higher still, and a small step moves quality a little."""
    K, T = 3, 5
    seed = [torch.zeros(T, K) for _ in range(K)]
    for k in range(K):
        seed[k][:, k] = 1.0
    d = torch.zeros(10)
    own = [synthetic_quality(seed[k], d, k) for k in range(K)]
    other = [synthetic_quality(seed[k], d, (k + 1) % K) for k in range(K)]
    assert all(o > x + 0.3 for o, x in zip(own, other))
    blend = 0.9 * seed[0] + 0.2 * seed[1] + 0.2 * seed[2]
    assert synthetic_quality(blend, d + 0.02, 0) > own[0]
    assert synthetic_quality(blend, d + 0.02, 0) == synthetic_quality(blend.clone(), d + 0.02, 0)
    step = synthetic_quality(blend + 1e-3, d + 0.02, 0)
    assert abs(step - synthetic_quality(blend, d + 0.02, 0)) < 1e-2
    with pytest.raises(ValueError, match="out of range"):
        synthetic_quality(blend, d, 5)


def test_options_are_checked_and_latency_is_slept():
    with pytest.raises(ConfigError):
        Synthetic("a", latency_s=-1)
    with pytest.raises(ConfigError):
        Synthetic("a", speed=1)
    task = Synthetic("a", latency_s=0.2)
    eng = GenomeOnlyEngine()
    eng._genome = Genome(a=torch.eye(3), d=torch.zeros(4), layout="x")
    t0 = time.perf_counter()
    r = task.evaluate(eng)
    assert time.perf_counter() - t0 >= 0.2 and r.seconds >= 0.2
    assert r.quality == synthetic_quality(torch.eye(3), torch.zeros(4), 0)


def test_genome_only_worker_loads_no_engine_and_scores_the_child(tiny_family, tmp_path):
    """With every task synthetic the worker holds no model; its scores are the function of the child's genome."""
    cfg = parse_config(_cfg(tiny_family, tmp_path))
    assert genome_only(cfg)
    w = ChildWorker(cfg, threads=1)
    assert isinstance(w.engine, GenomeOnlyEngine)
    seeds = [w.seed_genome(k) for k in range(3)]
    res = w.run(ChildSpec(index=1, id="g1", quality_task="a", parents=("s0", "s1"), seed=5), seeds[:2])
    assert res.error is None
    child = Genome.from_bytes(res.genome)
    assert res.scores == {t: synthetic_quality(child.a, child.d, k) for k, t in enumerate("abc")}
    assert res.scores["a"] != pytest.approx(synthetic_quality(Genome.from_bytes(seeds[0]).a, child.d, 0))


def test_a_model_task_beside_it_keeps_the_engine(tiny_family, tmp_path):
    """One task that needs a model: the engine loads, and the synthetic task says it cannot score there."""
    cfg = parse_config(_cfg(tiny_family, tmp_path, kinds=("synthetic", "likelihood", "likelihood")))
    assert not genome_only(cfg)
    w = ChildWorker(cfg, threads=1)
    assert not isinstance(w.engine, GenomeOnlyEngine)
    with pytest.raises(EngineUnsupported, match="genome"):
        w.tasks["a"].evaluate(w.engine)
