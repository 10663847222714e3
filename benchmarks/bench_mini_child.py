"""One mini child evaluated the plain way and cycleqd's way, same child, same run, same scores.

    python benchmarks/bench_mini_child.py   # prints a JSON object

The plain way: for each task, ``model.generate`` on the whole batch of 100 val items
(left-padded, greedy, default settings, ``max_new_tokens`` of the task), answers cut at
the end token and the first newline, then the checks the tasks made before gold runs
were reused (every answer through the sandbox; SQL in process, as the task does it).
cycleqd's way: ``ChildWorker.evaluate``. The child is a real one of the default mini
experiment (crossover of two seed experts, SVD mutation). Both paths see the same
resident model and warm task objects (the gold lines ran once, before timing, as they
do at the start of every run); the best of a few alternating repeats is kept.

What a worker has seen before a child makes it cheaper: the engine checks each prompt's
last completion (by another model) as a draft (see ``HFEngine``), and the code and shell
tasks reuse the clean check run of an answer already checked for the same item. So the
timed evaluation starts from a worker as a run starts it (fresh tasks, no drafts, the
base evaluated once for the gold lines) that then evaluated a *sibling* (the same
parents, another seed), as a run's worker has evaluated other children before this one:
the child never sees its own answers. ``mini_child_cold_speedup`` is the child right after
the start (no drafts; checks reused only where it answers as the base did). The checks of
the code and shell tasks run in sandbox processes while the next task generates: that
overlap uses a second core where one is free.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace

import torch

from cycleqd.config import load_config, resolve_paths
from cycleqd.engine.hf import cut_at_stop
from cycleqd.mini.generators.code import check_program, gold_outputs
from cycleqd.mini.generators.shell import same_output
from cycleqd.sandbox import run_python_batch, run_shell_batch


def _plain_answers(engine, task) -> list[str]:
    tok, model = engine.tokenizer, engine.model
    enc = [tok(it.prompt)["input_ids"] for it in task.items]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, width - len(e):], mask[i, width - len(e):] = torch.tensor(e), 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=tok.pad_token_id,
                             max_new_tokens=task.max_new_tokens)
    texts = []
    for row in out[:, width:].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        texts.append(cut_at_stop(tok.decode(row, skip_special_tokens=True), ["\n"]))
    return texts


def _plain_check(task, answers: list[str], gold_stdout: dict[str, str]) -> list[bool]:
    kind = type(task).__name__
    limits = dict(timeout=task._timeout, memory_mb=min(task.sandbox.memory_mb, 512), backend=task.sandbox.backend)
    if kind == "MiniCode":
        progs = []
        for it, a in zip(task.items, answers):
            inputs = [tuple(x) for x in it.context["inputs"]]
            progs.append(check_program(a, inputs, gold_outputs(it.answer, inputs)))
        return [r.returncode == 0 and not r.timed_out and r.error is None
                for r in run_python_batch(progs, **limits)]
    if kind == "MiniShell":
        runs = run_shell_batch([(dict(it.context["files"]), a) for it, a in zip(task.items, answers)], **limits)
        return [not r.timed_out and r.error is None and bool(a.strip()) and same_output(r.stdout, gold_stdout[it.id])
                for it, a, r in zip(task.items, answers, runs)]
    return [s.score == 1.0 for s in task.score_outputs(task.items, answers)]


def bench_mini_child(repeats: int = 3, config: str = "experiments/mini.yaml") -> dict:
    """``mini_child_speedup`` = plain seconds / cycleqd seconds for one child on 3 x 100 val items.

    Raises:
        AssertionError: the two paths disagree on any answer or score.
    """
    from cycleqd.evolve.worker import ChildWorker, build_tasks, make_child
    from cycleqd.mini.build import ensure_mini_world
    from cycleqd.model.genome import Genome
    from cycleqd.search.child import ChildSpec

    cfg = resolve_paths(load_config(config))
    ensure_mini_world(cfg)
    worker = ChildWorker(cfg)  # the threads a run's worker gets
    f = worker.factors
    spec = ChildSpec(index=0, id="bench", quality_task=cfg.task_names[0], parents=("s0", "s1"), seed=12345)
    child, _ = make_child(spec, [Genome.seed(0, f), Genome.seed(1, f)], cfg, f)
    sibling, _ = make_child(replace(spec, id="sibling", seed=999), [Genome.seed(0, f), Genome.seed(1, f)], cfg, f)

    def start_of_run() -> None:
        """The worker as a run starts it: tasks that have seen no answer, no drafts; then the gold lines run once."""
        worker.tasks = build_tasks(cfg)
        worker.engine.forget_drafts()
        worker.evaluate(Genome.base(f))

    start_of_run()
    gold = {it.id: r.stdout for it, r in zip(worker.tasks["shell"].items, run_shell_batch(
        [(dict(it.context["files"]), it.answer) for it in worker.tasks["shell"].items]))} \
        if "shell" in worker.tasks else {}

    def plain() -> tuple[dict[str, float], dict[str, list[str]]]:
        with torch.no_grad():
            worker.engine.load_genome(child, f)
        scores, answers = {}, {}
        for name, task in worker.tasks.items():
            answers[name] = _plain_answers(worker.engine, task)
            ok = _plain_check(task, answers[name], gold)
            scores[name] = sum(ok) / len(ok)
        return scores, answers

    t_plain, t_ours, t_cold = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain_scores, plain_out = plain()
        t_plain.append(time.perf_counter() - t0)
        start_of_run()
        worker.evaluate(sibling)  # what the worker evaluated before: drafts and checked answers of the sibling
        t0 = time.perf_counter()
        ours, seconds = worker.evaluate(child)
        t_ours.append(time.perf_counter() - t0)
        assert ours == plain_scores, (ours, plain_scores)
        start_of_run()
        worker.engine.forget_drafts()
        t0 = time.perf_counter()
        cold, _ = worker.evaluate(child)
        t_cold.append(time.perf_counter() - t0)
        assert cold == plain_scores, (cold, plain_scores)
    # generation alone, the same answers both ways (the rest of a child is its checks)
    start_of_run()
    worker.evaluate(sibling)
    with torch.no_grad():
        worker.engine.load_genome(child, f)
    gen_plain = gen_ours = 0.0
    for name, task in worker.tasks.items():
        t0 = time.perf_counter()
        _plain_answers(worker.engine, task)
        t1 = time.perf_counter()
        assert worker.engine.generate(task.requests(task.items)) == plain_out[name], name
        gen_plain, gen_ours = gen_plain + t1 - t0, gen_ours + time.perf_counter() - t1
    return {
        "mini_child_speedup": min(t_plain) / min(t_ours),
        "mini_child_plain_seconds": min(t_plain),
        "mini_child_ours_seconds": min(t_ours),
        "mini_child_cold_speedup": min(t_plain) / min(t_cold),
        "mini_child_cold_seconds": min(t_cold),
        "mini_child_generation_speedup": gen_plain / gen_ours,
        "mini_child_ours_breakdown": {k: round(v, 4) for k, v in seconds.items()},
        "mini_child_scores": ours,
        "mini_child_same_scores": True,
        "mini_child_threads": torch.get_num_threads(),
        "mini_child_note": "torch on one thread; the code and shell checks run in sandbox processes while the "
                           "next task generates, on a second core where one is free",
    }


if __name__ == "__main__":
    print(json.dumps(bench_mini_child(), indent=2))
