"""The `cycleqd` command: parse -> load config -> one library call per subcommand.

Exit codes: 0 done; 2 bad input (one line on stderr, nothing written); 1 anything
else, with the run left resumable.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cycleqd.config import ConfigError
from cycleqd.runs import layout


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _cell(text: str) -> tuple[int, ...]:
    try:
        cell = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--cell must be comma-separated integers like 3,7, got {text!r}") from None
    if any(c < 0 for c in cell):
        raise ConfigError(f"--cell indices must be >= 0, got {text!r}")
    return cell


def _tasks(text: str | None) -> list[str] | None:
    if text is None:
        return None
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks is empty")
    return tasks


def _print_summary(run: Path) -> None:
    import json as _json

    from cycleqd.evolve.loop import format_summary

    print(format_summary(_json.loads((Path(run) / layout.SUMMARY).read_text())))
    print(f"\nrun folder: {run}  (plots in {Path(run) / 'plots'}; `cycleqd report {run}` for the HTML page)")


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _observers() -> list:
    """What the CLI's runs show besides the progress bar: RUN/plots, redrawn as the run goes."""
    from cycleqd.views.plots import PlotObserver

    return [PlotObserver()]


def _where(a: argparse.Namespace) -> None:
    if a.in_process and a.address:
        raise ConfigError("--in-process and --address: choose one (in this process, or on that Ray cluster)")


def cmd_evolve(a: argparse.Namespace) -> int:
    from cycleqd.config import load_config, with_overrides

    _where(a)
    cfg = with_overrides(load_config(a.config), tasks=_tasks(a.tasks), generations=a.generations,
                         workers=a.workers, seed=a.seed)
    if a.record_episodes:
        from cycleqd.config import edit_config

        cfg = edit_config(cfg, lambda data: data["evolution"].update(record_episodes=True))
    if a.run_dir and Path(a.run_dir).exists():
        from cycleqd.runs.lock import RunLock

        RunLock.refuse_if_held(a.run_dir)
    if a.run_dir and Path(a.run_dir).exists() and any(Path(a.run_dir).iterdir()):
        hint = f"; continue it with `cycleqd resume {a.run_dir}`" if (Path(a.run_dir) / layout.CONFIG).exists() else ""
        raise ConfigError(f"run folder {a.run_dir!r} exists and is not empty{hint}")
    from cycleqd.model.plan import check_plan

    plan = check_plan(cfg)  # before Ray starts or anything is loaded or written
    if not a.quiet:
        print(plan.format(), flush=True)
    from cycleqd.evolve.loop import evolve

    run = evolve(cfg, a.run_dir, address=a.address, progress=not a.quiet, observers=_observers(),
                 in_process=a.in_process)
    _print_summary(run)
    return 0


def cmd_resume(a: argparse.Namespace) -> int:
    from cycleqd.runs.lock import RunLock
    from cycleqd.runs.store import RunStore

    _where(a)
    RunStore(a.run_dir).config()  # bad input (not a run, an unreadable config) before anything starts
    RunLock.refuse_if_held(a.run_dir)  # before the heavy imports; resume takes the lock itself
    from cycleqd.evolve.loop import resume

    run = resume(a.run_dir, generations=a.generations, address=a.address, progress=not a.quiet,
                 observers=_observers(), in_process=a.in_process)
    _print_summary(run)
    return 0


def cmd_grow(a: argparse.Namespace) -> int:
    from cycleqd.evolve.grow import grow, load_grow_spec
    from cycleqd.runs.store import RunStore

    RunStore(a.run_dir).config()
    spec = load_grow_spec(a.task)  # bad input before anything is written
    from cycleqd.evolve.signals import RunInterrupted

    try:
        run = grow(a.run_dir, spec, progress=not a.quiet, observers=_observers())
    except RunInterrupted as e:
        name = signal_name(e.signum)
        print(f"cycleqd: grow stopped by {name}; {a.run_dir} is as it was until the next `cycleqd grow` or "
              "`cycleqd resume` finishes or discards the staged growth", file=sys.stderr)
        return 1
    print(f"grown: {run} now has tasks {', '.join(RunStore(run).config().task_names)}; "
          f"continue with `cycleqd resume {run} --generations N`")
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    from cycleqd.config import load_config
    from cycleqd.evolve.worker import ready_config

    cfg = ready_config(load_config(a.config))
    from cycleqd.model.factors import prepare_command

    print(f"factors cached in {prepare_command(cfg)}")
    return 0


def _read_table(path: str) -> dict:
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such table (make it with `make table`)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a table JSON ({e})") from None
    if not isinstance(table, dict) or "rows" not in table or "test_n" not in table:
        raise ConfigError(f"{path}: not a table JSON (no rows, no test_n)")
    return table


def _compare_tables(reference: dict, other: dict, ref_path: str, flag: str) -> dict:
    from cycleqd.studies.replication import compare_tables, format_comparison

    try:
        rep = compare_tables(reference, other)
    except ValueError as e:
        raise ConfigError(f"{flag} {ref_path}: {e}") from None
    print(format_comparison(rep))
    return {"against": ref_path, **rep}


def cmd_table(a: argparse.Namespace) -> int:
    from cycleqd.config import load_config

    if a.compare:
        if a.rescore or a.choose_only or a.against:
            raise ConfigError("--compare reads two finished tables; it takes no --rescore, --choose-only or --against")
        _compare_tables(_read_table(a.compare[0]), _read_table(a.compare[1]), a.compare[0], "--compare")
        return 0
    if a.against and not a.rescore:
        raise ConfigError("--against compares a rescored table with another; it needs --rescore")
    reference = _read_table(a.against) if a.against else None  # bad input before anything heavy
    if reference is not None and reference["test_n"] != a.test_n:
        raise ConfigError(f"--against {a.against} was scored on {reference['test_n']} items per task, this draw on "
                          f"{a.test_n}: compare draws of the same size (--test-n {reference['test_n']})")
    if min(a.seeds, a.test_n, a.select_n) < 1 or (a.generations is not None and a.generations < 1):
        raise ConfigError("--seeds, --generations, --test-n and --select-n must be >= 1")
    if a.rescore and a.choose_only:
        raise ConfigError("--rescore and --choose-only exclude each other")
    if a.rescore and not a.models:
        raise ConfigError("--rescore needs --models (the folder `make table` wrote)")
    cfg = None if a.rescore else load_config(a.config)  # bad input before anything heavy
    from cycleqd.atomic import write_atomic
    from cycleqd.studies.table import make_table, plot_table, print_table, score_models

    out, models = Path(a.out), Path(a.models) if a.models else None
    if a.choose_only:
        from cycleqd.studies.table import choose_models

        manifest = choose_models(cfg, models or out.parent / f"{out.stem}_models", seeds=a.seeds,
                                 generations=a.generations, variants=a.variants.split(",") if a.variants else None,
                                 evolve_n=a.evolve_n, select_n=a.select_n, runs_root=Path(a.runs_root),
                                 in_process=a.in_process)
        print("rows chosen: " + ", ".join(f"{n} ({len(fs)})" for n, fs in manifest["rows"].items()))
        return 0
    if a.rescore:
        table = score_models(models, test_n=a.test_n, test_seed=a.test_seed,
                             cache=Path(a.scores_cache) if a.scores_cache else None)
        if reference is not None:
            table["replication"] = _compare_tables(reference, table, a.against, "--against")
        write_atomic(out, json.dumps(table, indent=2))
    else:
        table = make_table(cfg, out, models_dir=models, seeds=a.seeds, generations=a.generations, test_n=a.test_n,
                           test_seed=a.test_seed, variants=a.variants.split(",") if a.variants else None,
                           evolve_n=a.evolve_n, select_n=a.select_n, runs_root=Path(a.runs_root),
                           cache=Path(a.scores_cache) if a.scores_cache else None, in_process=a.in_process)
    plot_table(table, out.with_suffix(".png"))
    print_table(table)
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from cycleqd.config import load_config, with_overrides
    from cycleqd.model.plan import memory_plan, parse_bytes

    cfg = with_overrides(load_config(a.config, check_paths=False), workers=a.workers)
    from cycleqd.model.adapters import parse_lora_plan

    plan = memory_plan(cfg, arch=a.arch, device_bytes=parse_bytes(a.device_memory) if a.device_memory else None,
                       host_bytes=parse_bytes(a.host_memory) if a.host_memory else None,
                       lora=parse_lora_plan(a.lora) if a.lora else None)
    print(json.dumps(plan.to_json()) if a.json else plan.format())
    if not plan.fits:
        print(f"cycleqd: error: memory plan does not fit: {plan.problem}", file=sys.stderr)
        return 2
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    from cycleqd.runs.folder import RunFolder

    run = RunFolder(a.run_dir)
    if a.json:
        snap = run.snapshot()  # rebuilt from seeds.json and children.jsonl when archives.json is stale
        search = {"name": run.config.evolution.search.name}
        if search["name"] == "nsga2":  # its archive is the Pareto front
            search["front"] = run.front(snap.generation)
        print(json.dumps({"generation": snap.generation, "tasks": snap.tasks, "archives": snap.archives,
                          "archive": snap.archive, "final_merge": run.final_merge(), "search": search,
                          "truncated": run.truncation()}))
        return 0
    from rich.console import Console

    from cycleqd.views.show import render_show

    render_show(run.path, Console())
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    from cycleqd.runs.check import check_run

    report = check_run(a.run_dir, repair=a.repair)
    print(report.format())
    return 0 if report.ok else 1


def cmd_heatmap(a: argparse.Namespace) -> int:
    from cycleqd.runs.store import RunStore

    store = RunStore(a.run_dir)
    if a.generation is not None and a.generation < 0:
        raise ConfigError(f"--generation must be >= 0, got {a.generation}")
    from cycleqd.views.plots import write_heatmaps, write_history

    out = Path(a.out) if a.out else store.plots_dir
    files = write_heatmaps(store.path, out, a.generation) + write_history(store.path, out)
    if store.config().evolution.search.name == "nsga2":  # NSGA-II's archive: its Pareto front
        from cycleqd.views.front_plot import write_front

        files += write_front(store.path, out, a.generation)
    for f in files:
        print(f)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from cycleqd.runs.store import RunStore

    store = RunStore(a.run_dir)
    from cycleqd.views.report import write_report

    print(write_report(store.path))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    cell = _cell(a.cell) if a.cell is not None else None
    if (a.archive is None) != (cell is None):
        raise ConfigError("--archive and --cell go together")
    from cycleqd.runs.store import RunStore

    store = RunStore(a.run_dir)
    from cycleqd.evolve.signals import RunInterrupted
    from cycleqd.views.export import export, export_team

    try:
        if a.team is not None:
            out = export_team(store.path, a.team, out=Path(a.out), push_to_hub=a.push_to_hub, private=a.private)
        else:
            out = export(store.path, best=a.best, archive=a.archive, cell=cell, merged=a.merged, out=Path(a.out),
                         push_to_hub=a.push_to_hub, private=a.private, dense=a.dense)
    except RunInterrupted as e:
        print(f"cycleqd: export stopped by {signal_name(e.signum)}; nothing written to {a.out}", file=sys.stderr)
        return 1
    print(out)
    return 0


def cmd_team(a: argparse.Namespace) -> int:
    from cycleqd.runs.store import RunStore

    RunStore(a.run_dir)
    if a.n is not None and a.n < 1:
        raise ConfigError(f"--n must be >= 1, got {a.n}")
    from cycleqd.studies.team import TEAM_FILE, format_team, make_team

    out = make_team(a.run_dir, a.strategy, size=a.size, layers=a.layers, out=a.out, split=a.split, n=a.n,
                    seed=a.draw_seed, progress=not a.quiet)
    print(format_team(json.loads((out / TEAM_FILE).read_text())))
    print(out / TEAM_FILE)
    return 0


def cmd_trajectories(a: argparse.Namespace) -> int:
    from cycleqd.runs.store import RunStore

    RunStore(a.run_dir)
    if a.n is not None and a.n < 1:
        raise ConfigError(f"--n must be >= 1, got {a.n}")
    from cycleqd.studies.trajectories import harvest

    res = harvest(a.run_dir, a.out, regenerate=a.regenerate, every_elite=a.every_elite, tasks=_tasks(a.tasks), top=a.top,
                  split=a.split, n=a.n, seed=a.draw_seed, progress=not a.quiet)
    per_task = ", ".join(f"{t} {k}" for t, k in res["per_task"].items()) or "none"
    print(f"{res['lines']} trajectories ({per_task}) from {res['elites']} elites "
          f"({res['recorded']} recorded, {res['regenerated']} regenerated) -> {a.out}")
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    if (a.model is None) == (a.answers is None):
        raise ConfigError("give exactly one of --model DIR or --answers FILE")
    from cycleqd.studies.score import score

    res = score(a.task, a.data, model=a.model, answers=a.answers, ids=a.ids, select=a.select, protocol=a.protocol)
    if a.json:
        print(json.dumps({"task": res.task, "quality": res.quality, "n": res.n, "failed_ids": res.failed_ids}))
    else:
        print(f"{res.task}: quality {res.quality:.4f} over {res.n} samples ({res.seconds:.1f}s); "
              f"{len(res.failed_ids)} failed")
    return 0


def cmd_mini_finetune(a: argparse.Namespace) -> int:
    if a.test_n < 1:
        raise ConfigError(f"--test-n must be >= 1, got {a.test_n}")
    from cycleqd.mini.finetune import finetune

    rec = finetune(a.dir, a.trajectories, a.skill, a.out, steps=a.steps, seed=a.seed, test_n=a.test_n,
                   progress=not a.quiet)
    t = rec["test"]
    print(f"{a.skill}: fine-tuned on {rec['items']} trajectories ({rec['distinct_prompts']} prompts) "
          f"-> test {t['finetuned'][a.skill]:.3f}; original expert {t['expert_' + a.skill][a.skill]:.3f}; "
          f"base {t['base'][a.skill]:.3f} (n={t['n']})\n{Path(a.out) / 'finetune.json'}")
    return 0


def cmd_mini(a: argparse.Namespace) -> int:
    from cycleqd.mini.build import build_mini_world

    path = build_mini_world(a.dir, seed=a.seed, size=a.size, force=not a.keep)
    if a.experts == "lora":
        from cycleqd.mini.build import build_lora_experts

        path = build_lora_experts(path, seed=a.seed, size=a.size, force=not a.keep)
    print(path)
    return 0


IN_PROCESS = ("no Ray: one worker in this process evaluates the children one at a time (debugging, quick "
              "runs; evolution.workers is ignored, the run folder is the same)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cycleqd", description="CycleQD: evolutionary model merging with cyclic quality-diversity.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("evolve", help="start a CycleQD run")
    e.add_argument("--config", required=True, help="experiment YAML (e.g. experiments/mini.yaml)")
    e.add_argument("--tasks", help="comma-separated subset of the config's tasks (>= 2)")
    e.add_argument("--generations", type=int, help="children to evaluate (one generation = one finished child)")
    e.add_argument("--workers", type=int, help="parallel workers (Ray actors)")
    e.add_argument("--run-dir", help="run folder (default archives/<name>-<time>)")
    e.add_argument("--seed", type=int)
    e.add_argument("--address", help="join an existing Ray cluster (e.g. ray://host:10001 or auto)")
    e.add_argument("--in-process", action="store_true", help=IN_PROCESS)
    e.add_argument("--record-episodes", action="store_true",
                   help="keep the elites' passing conversations (evolution.record_episodes) for `cycleqd trajectories`")
    e.set_defaults(func=cmd_evolve)

    r = sub.add_parser("resume", help="continue a run after a crash or to more generations")
    r.add_argument("run_dir")
    r.add_argument("--generations", type=int, help="new total number of generations")
    r.add_argument("--address")
    r.add_argument("--in-process", action="store_true", help=IN_PROCESS)
    r.set_defaults(func=cmd_resume)

    gr = sub.add_parser("grow", help="add a task and its expert to a run (K -> K+1), then resume it")
    gr.add_argument("run_dir")
    gr.add_argument("--task", required=True, help="grow spec YAML: task, expert (see experiments/mini_grow.yaml)")
    gr.set_defaults(func=cmd_grow)

    pr = sub.add_parser("prepare", help="compute and cache task vectors and SVD factors")
    pr.add_argument("--config", required=True)
    pr.set_defaults(func=cmd_prepare)

    pl = sub.add_parser("plan", help="memory per worker (from config.json and safetensors headers) and whether it fits")
    pl.add_argument("--config", required=True)
    pl.add_argument("--arch", help="config.json giving the architecture (for Hub ids not on disk)")
    pl.add_argument("--workers", type=int)
    pl.add_argument("--device-memory", help="memory of the engine's GPUs together, e.g. 80GB (default: what CUDA reports)")
    pl.add_argument("--host-memory", help="host memory, e.g. 512GB (default: this machine's)")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--lora", help="plan LoRA experts not on disk: RANK[:module,module,...] (default: all linear)")
    pl.set_defaults(func=cmd_plan)

    s = sub.add_parser("show", help="the archives' elites and stats")
    s.add_argument("run_dir")
    s.add_argument("--json", action="store_true", help="one JSON object (DESIGN.md section 7)")
    s.set_defaults(func=cmd_show)

    c = sub.add_parser("check", help="report what in a run folder cannot be trusted (exit 1 if anything)")
    c.add_argument("run_dir")
    c.add_argument("--repair", action="store_true",
                   help="move what cannot be trusted into RUN/quarantine/ (never deletes) so the run resumes")
    c.set_defaults(func=cmd_check)

    h = sub.add_parser("heatmap", help="archive heatmaps (PNG and SVG) and history plots")
    h.add_argument("run_dir")
    h.add_argument("--out", help="folder (default RUN/plots)")
    h.add_argument("--generation", type=int, help="archives as they were at this generation")
    h.set_defaults(func=cmd_heatmap)

    rp = sub.add_parser("report", help="one offline HTML page in the run folder")
    rp.add_argument("run_dir")
    rp.set_defaults(func=cmd_report)

    x = sub.add_parser("export", help="write an elite as a Hugging Face model folder (and push it)")
    x.add_argument("run_dir")
    g = x.add_mutually_exclusive_group(required=True)
    g.add_argument("--best", choices=["mean"], help="the elite with the best mean over the tasks")
    g.add_argument("--archive", help="archive (task name) holding the elite; with --cell")
    g.add_argument("--merged", action="store_true", help="the final merge")
    g.add_argument("--team", help="a team.json from `cycleqd team`: one model folder per member, team.json, README")
    x.add_argument("--cell", help="cell indices, e.g. 3,7")
    x.add_argument("--out", required=True)
    x.add_argument("--push-to-hub", metavar="REPO_ID")
    x.add_argument("--private", action="store_true")
    x.add_argument("--dense", action="store_true",
                   help="LoRA experts: write full weights instead of a PEFT adapter folder")
    x.set_defaults(func=cmd_export)

    tm = sub.add_parser("team", help="a team of archive elites (router, vote, mixture of agents), scored "
                                     "beside the best single elite; writes team.json")
    tm.add_argument("run_dir")
    tm.add_argument("--strategy", required=True, choices=["router", "vote", "moa"],
                    help="router: task-labelled and NLL routers; vote: execution vote; moa: mixture of agents")
    tm.add_argument("--size", type=int, default=3, help="voters / proposers per task (default 3)")
    tm.add_argument("--layers", type=int, default=1, help="moa: rounds of proposals before the aggregator")
    tm.add_argument("--out", help="folder for team.json and the members' genomes (default RUN/teams/STRATEGY)")
    tm.add_argument("--split", choices=["train", "val", "test"],
                    help="score on this split of the tasks (mini tasks), e.g. test")
    tm.add_argument("--n", type=int, help="items per task with --split")
    tm.add_argument("--draw-seed", type=int, help="which items --split draws")
    tm.set_defaults(func=cmd_team)

    tj = sub.add_parser("trajectories", help="the elites' successful conversations as ShareGPT JSONL "
                                             "(for fine-tuning the next expert)")
    tj.add_argument("run_dir")
    tj.add_argument("--out", required=True, help="JSONL file to write")
    rg = tj.add_mutually_exclusive_group()
    rg.add_argument("--regenerate", action="store_true", default=None,
                    help="evaluate the elites again: those without recorded episodes (the default), or all of "
                         "them on --split / --n / --draw-seed items")
    rg.add_argument("--recorded-only", dest="regenerate", action="store_false",
                    help="use recorded episodes only; never evaluate an elite")
    tj.add_argument("--every-elite", action="store_true",
                    help="one line per elite that solved a sample (default: the best elite's only)")
    tj.add_argument("--tasks", help="comma-separated tasks to keep (and to regenerate)")
    tj.add_argument("--top", type=int, help="only the N best elites of each kept task's archive")
    tj.add_argument("--split", choices=["train", "val", "test"], help="ask every elite about items of this split")
    tj.add_argument("--n", type=int, help="with --split: items per task")
    tj.add_argument("--draw-seed", type=int, help="with --split: which items are drawn")
    tj.set_defaults(func=cmd_trajectories)

    sc = sub.add_parser("score", help="score a model or recorded answers on one task")
    sc.add_argument("task", help="task kind: mbpp, dbbench, os_interaction, mini_code, mini_sql, mini_shell")
    sc.add_argument("--data", required=True)
    sc.add_argument("--model")
    sc.add_argument("--answers", help='JSONL of {"id": ..., "turns": [...]}')
    sc.add_argument("--ids", nargs="+")
    sc.add_argument("--select", help="all | official (dbbench, os_interaction: the official CycleQD sample set)")
    sc.add_argument("--protocol", help="official (default) | agentbench (dbbench, os_interaction); "
                                       "official | evalplus | plain (mbpp)")
    sc.add_argument("--json", action="store_true")
    sc.set_defaults(func=cmd_score)

    tb = sub.add_parser("table", help="the mini table: CycleQD and its ablations against task arithmetic, TIES "
                                      "and teams, at equal budget, on held-out test items (make table)")
    tb.add_argument("--config", default="experiments/mini.yaml")
    tb.add_argument("--out", default="experiments/results/mini_table.json")
    tb.add_argument("--models", help="folder of the chosen models (default: <out>_models next to --out)")
    tb.add_argument("--rescore", action="store_true",
                    help="only score the models folder on a fresh test draw (--test-seed); no evolution")
    tb.add_argument("--seeds", type=int, default=3)
    tb.add_argument("--generations", type=int)
    tb.add_argument("--choose-only", action="store_true",
                    help="only evolve (or resume) the runs and choose their models on val; no test item is scored")
    tb.add_argument("--test-n", type=int, default=1500, help="test items per task (default 1500)")
    tb.add_argument("--test-seed", type=int, default=0, help="which test items are drawn (default 0)")
    tb.add_argument("--evolve-n", type=int, help="val items per task scored during evolution (default: config)")
    tb.add_argument("--select-n", type=int, default=200,
                    help="val items per task, unseen by evolution, for choosing models (default 200)")
    tb.add_argument("--runs-root", default="archives/table", help="folder of the table's runs")
    tb.add_argument("--in-process", action="store_true", help="evolve the runs without Ray: " + IN_PROCESS)
    tb.add_argument("--scores-cache", default=".cache/table_scores",
                    help="folder of per-model test scores, so an interrupted scoring resumes ('' for none)")
    tb.add_argument("--against", metavar="TABLE",
                    help="with --rescore: set each conclusion beside this table's (another draw of the same models), "
                         "with the chance a fresh draw repeats it and the items per task it needs to hold")
    tb.add_argument("--compare", nargs=2, metavar=("TABLE", "OTHER"),
                    help="only compare the conclusions of two finished tables of the same models (no scoring)")
    tb.add_argument("--variants", help="comma-separated subset of the variants (cycleqd, fixed_axes, "
                                       "gaussian_mutation, uniform_sampling, cma_es, nsga2, random)")
    tb.set_defaults(func=cmd_table)

    m = sub.add_parser("mini", help="the embedded mini world")
    msub = m.add_subparsers(dest="mini_command", required=True, parser_class=_Parser)
    mb = msub.add_parser("build", help="(re)build the mini world's tokenizer, base and experts")
    mb.add_argument("--dir", default=".cache/mini")
    mb.add_argument("--seed", type=int, default=0)
    mb.add_argument("--size", choices=["default", "small", "tiny"], default="default")
    mb.add_argument("--keep", action="store_true", help="reuse a matching cached build")
    mb.add_argument("--experts", choices=["dense", "lora"], default="dense",
                    help="lora: also train PEFT LoRA experts from the base (dir/lora_<skill>)")
    mb.set_defaults(func=cmd_mini)
    mf = msub.add_parser("finetune", help="a new expert from the base, fine-tuned on `cycleqd trajectories` JSONL, "
                                          "scored beside the original expert")
    mf.add_argument("--trajectories", required=True, help="JSONL written by `cycleqd trajectories`")
    mf.add_argument("--skill", required=True, choices=["code", "sql", "shell"])
    mf.add_argument("--out", required=True, help="folder for the model and finetune.json")
    mf.add_argument("--dir", default=".cache/mini", help="the mini world (default .cache/mini)")
    mf.add_argument("--steps", type=int, help="training steps (default: the world's expert recipe)")
    mf.add_argument("--seed", type=int, default=0)
    mf.add_argument("--test-n", type=int, default=300, help="test items to score on (default 300)")
    mf.set_defaults(func=cmd_mini_finetune)
    return p


def main(argv: list[str] | None = None) -> int:
    from cycleqd.evolve.signals import note_parent

    note_parent()  # a driver stops when the process that started it ends (not under nohup)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from cycleqd.evolve.pool import local_ray_env

    local_ray_env()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"cycleqd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cycleqd: interrupted; the run can be continued with `cycleqd resume`", file=sys.stderr)
        return 1
    except Exception as e:
        if args.verbose:
            raise
        print(f"cycleqd: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except BaseException as e:
        signals = sys.modules.get("cycleqd.evolve.signals")  # only a loaded driver raises RunInterrupted
        if signals is not None and isinstance(e, signals.RunInterrupted):
            print(f"cycleqd: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
