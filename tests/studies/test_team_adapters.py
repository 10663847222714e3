"""Teams of adapters: over LoRA experts a team's members are adapters of one engine (no weight switch),
and every strategy answers exactly as the same team with its members materialised in turn."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mini_run import make_lora_run

from cycleqd.runs.folder import RunFolder
from cycleqd.studies.team import Residents, choose_team, evaluate_team

SPECS = {
    "code": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "sql": {"r": 16, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], "use_rslora": True},
    "shell": {"r": 2, "lora_alpha": 6, "target_modules": ["gate_proj", "down_proj"]},
}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, small_world: Path) -> Path:
    """Four children over three random LoRA experts of the small world's base (no Ray)."""
    return make_lora_run(tmp_path_factory.mktemp("team_lora"), small_world, SPECS, seed=8, generations=4,
                         evolution={"crossover": {"name": "linear", "sigma": 0.3}, "mutation": {"name": "svd", "rate": 0.3}})


def _residents(run: Path, team, adapters: bool):
    from cycleqd.evolve.worker import ChildWorker

    folder = RunFolder(run)
    worker = ChildWorker(folder.config, threads=1)
    genomes = {m.genome: folder.store.load_genome(m.genome) for m in team.members}
    return Residents(worker.engine, worker.factors, genomes, adapters=adapters), worker.tasks


@pytest.mark.parametrize("strategy", ["router", "vote", "moa"])
def test_team_of_adapters_equals_members_materialised_in_turn(lora_run, strategy):
    """Members served as adapters (no switch, base weights untouched) give the answers, routing and
    scores of the same team whose members are materialised into the engine one at a time."""
    team = choose_team(RunFolder(lora_run).snapshot(), strategy, size=2)
    shared, tasks = _residents(lora_run, team, adapters=True)
    swapped, tasks2 = _residents(lora_run, team, adapters=False)
    assert shared.as_adapters and not swapped.as_adapters
    before = {n: p.detach().clone() for n, p in shared.engine.model.named_parameters() if "lora_" not in n}
    got, got_engines = evaluate_team(team, shared, tasks)
    want, want_engines = evaluate_team(team, swapped, tasks2)
    assert shared.switches == 0 and swapped.switches > 0
    for v in team.variants:
        for name in tasks:
            assert got[v][name].quality == want[v][name].quality, (v, name)
            assert ([s.detail["output"] for s in got[v][name].samples]
                    == [s.detail["output"] for s in want[v][name].samples]), (v, name)
            assert ([r["member"] for r in got_engines[v][name].trace]
                    == [r["member"] for r in want_engines[v][name].trace]), (v, name)
    after = {n.replace(".base_layer", ""): p for n, p in shared.engine.model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(after[n], w) for n, w in before.items())  # no member was written into the base
    # the members differ: a team of one model would test nothing
    answers = {g: shared.generate(g, tasks["code"].requests(tasks["code"].items)) for g in team.used(team.variants[0])}
    assert len(answers) < 2 or len({tuple(a) for a in answers.values()}) > 1
