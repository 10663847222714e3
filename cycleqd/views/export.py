"""``cycleqd export``: one model of a run as an ordinary Hugging Face model folder.

The chosen genome is materialised exactly as a worker does inside the run: the
base model is loaded in the run's dtype and the genome's weights are written
into its state in place, so the exported model gives the same logits (and the
same task scores) as the model the run evaluated. The folder holds safetensors
shards, the base's tokenizer and generation config, a model card with YAML
metadata and the genome itself (``cycleqd/``), and can be pushed to the Hub.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cycleqd.config import ConfigError
from cycleqd.evolve.signals import RunInterrupted, StopSignals
from cycleqd.registry import did_you_mean
from cycleqd.runs import layout
from cycleqd.runs.folder import ArchiveSnapshot, RunFolder, best_by_mean
from cycleqd.runs.store import RunDamaged
from cycleqd.views.card import base_card_metadata, model_card, team_card
from cycleqd.views.hub import hub_token, push_folder

__all__ = ["Selection", "export", "select", "parse_cell"]

@dataclass(frozen=True)
class Selection:
    """The model picked for export: genome id, its scores and how it was picked."""

    genome: str
    scores: dict[str, float]
    how: str
    generation: int | None = None


def parse_cell(cell: str | Sequence[int], snap: ArchiveSnapshot, archive: str) -> tuple[int, ...]:
    """``"i,j"`` (or a sequence of ints) as a valid cell of ``archive``. Raises ConfigError."""
    others = snap.other_tasks(archive)
    if isinstance(cell, str):
        parts = [p.strip() for p in cell.split(",")]
        if not all(re.fullmatch(r"-?\d+", p) for p in parts):
            example = ",".join("0" for _ in others)
            raise ConfigError(f"--cell {cell!r}: expected {len(others)} integers separated by commas, e.g. {example}")
        idx = tuple(int(p) for p in parts)
    else:
        try:
            idx = tuple(int(i) for i in cell)
        except (TypeError, ValueError):
            raise ConfigError(f"--cell {cell!r}: expected integers") from None
    if len(idx) != len(others):
        raise ConfigError(f"--cell {','.join(map(str, idx))}: archive {archive!r} has {len(others)} axes "
                          f"({', '.join(others)}), got {len(idx)} indices")
    for i, t in zip(idx, others):
        n = snap.bins[t].count
        if not 0 <= i < n:
            raise ConfigError(f"--cell {','.join(map(str, idx))}: index {i} for axis {t!r} is out of range 0..{n - 1}")
    return idx


def select(
    run_dir: str | Path,
    *,
    best: str | None = "mean",
    archive: str | None = None,
    cell: str | Sequence[int] | None = None,
    merged: bool = False,
) -> Selection:
    """Pick the genome to export. Raises ConfigError for bad input (nothing is written).

    Exactly one of: ``best="mean"`` (the elite of any archive with the best mean
    score over all tasks), ``archive`` + ``cell`` (the elite in that cell), or
    ``merged`` (the run's final merge).
    """
    run = RunFolder(run_dir)
    store = run.store
    snap = run.snapshot()
    chosen = [best is not None, archive is not None or cell is not None, bool(merged)]
    if sum(chosen) != 1:
        raise ConfigError("export: choose exactly one of --best mean, --archive TASK --cell i,j, or --merged")
    if best is not None:
        if best != "mean":
            raise ConfigError(f"--best {best!r}: only 'mean' is supported")
        ranked = best_by_mean(snap)
        if not ranked:
            raise ConfigError(f"run {str(run_dir)!r} has no elites to export")
        top = ranked[0]
        return Selection(top["genome"], dict(top["scores"]),
                         f"best mean score over {', '.join(snap.tasks)} ({top['mean']:.4f}) among all elites",
                         top["generation"])
    if archive is not None or cell is not None:
        if archive is None or cell is None:
            raise ConfigError("--archive and --cell go together")
        if archive not in snap.tasks:
            hint = did_you_mean(archive, snap.tasks)
            raise ConfigError(f"--archive {archive!r}: no such archive{hint} (tasks: {', '.join(snap.tasks)})")
        idx = parse_cell(cell, snap, archive)
        for e in snap.archives[archive]["elites"]:
            if tuple(e["cell"]) == idx:
                return Selection(e["genome"], dict(e["scores"]),
                                 f"elite of archive {archive} at cell {','.join(map(str, idx))} "
                                 f"(bins of {', '.join(snap.other_tasks(archive))})", e["generation"])
        raise ConfigError(f"--cell {','.join(map(str, idx))}: that cell of archive {archive!r} is empty")
    final = store.final_merge()
    if final is None:
        raise ConfigError(f"--merged: run {str(run_dir)!r} has no final merge (final_merge.json)")
    if final.get("error") or not store.genome_path(final["genome"]).is_file():
        raise ConfigError(f"--merged: the run's final merge failed ({final.get('error') or 'no genome file'})")
    weights = ", ".join(f"{t} {w:.3f}" for t, w in (final.get("weights") or {}).items())
    return Selection(final["genome"], dict(final.get("scores") or {}),
                     f"final merge of the archives' best elites (softmax weights: {weights})",
                     final.get("generation"))


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a file")
        if any(out.iterdir()) and not overwrite:
            raise ConfigError(f"--out {str(out)!r} exists and is not empty")
    elif out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out {str(out)!r}: parent is not a folder")


def _materialized_engine(cfg, genome_path: Path, shape=None):
    """A transformers engine on the CPU in the run's dtype, with the genome streamed in as a worker does.

    Every weight is checked as it arrives, in the dtype it is written in: a genome whose
    model has a NaN or an infinite weight (an overflow in float16 included) is refused.

    Raises:
        RunDamaged: the genome is not readable, or its model has non-finite weights (naming the genome file).
    """
    import torch

    from cycleqd.config import EngineConfig
    from cycleqd.engine.hf import HFEngine
    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import Genome, iter_weights

    factors = Factors.prepare(cfg, device="cpu", progress=False)
    try:
        genome = Genome.load(genome_path, shape)
    except ValueError as e:
        raise RunDamaged(genome_path, f"not a readable genome ({e})") from None
    options = {"revision": cfg.models.revision} if cfg.models.revision else {}
    engine = HFEngine.from_path(cfg.models.base, EngineConfig(device="cpu", options=options), dtype=cfg.models.dtype)

    def checked():
        for name, w in iter_weights(genome, factors, device=engine.device, dtype=engine.dtype):
            if not bool(torch.isfinite(w).all()):
                bad = int((~torch.isfinite(w)).sum())
                raise RunDamaged(genome_path, f"its model has {bad} non-finite weight(s) (NaN or inf) in {name} "
                                              f"as {cfg.models.dtype}; refusing to export it")
            yield name, w

    with torch.no_grad():
        engine.load_weights(checked())
    return engine


def export(
    run_dir: str | Path,
    *,
    best: str | None = "mean",
    archive: str | None = None,
    cell: str | Sequence[int] | None = None,
    merged: bool = False,
    out: str | Path,
    push_to_hub: str | None = None,
    private: bool = False,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    dense: bool = False,
) -> Path:
    """Write one model of a run as a Hugging Face folder at ``out`` (and optionally push it).

    With LoRA experts the folder is a PEFT LoRA adapter of the base (``adapter_config.json``,
    ``adapter_model.safetensors``: ``PeftModel.from_pretrained(base, out)`` loads it), unless
    ``dense`` (full weights) or the genome holds terms that are not low rank (full weights too).

    Pick with ``best="mean"``, ``archive`` + ``cell`` (``"i,j"`` or ints), or
    ``merged=True`` (pass ``best=None`` with the other two). The folder holds
    ``config.json``, safetensors shards of at most ``max_shard_size``, the base's
    tokenizer and generation config, ``README.md`` (model card with YAML
    metadata) and ``cycleqd/`` (genome, resolved config, provenance JSON).

    Raises:
        ConfigError: no such run, bad selection (unknown archive, malformed, out of
            range or empty cell, no final merge), ``out`` not empty, or no Hub
            token for ``push_to_hub``; RunDamaged: the genome file is malformed, oversized,
            or it or its model's weights are not finite; raised before anything is written.
        RunInterrupted: SIGTERM or SIGINT; the staging folder is removed and ``out`` is untouched.
    """
    if archive is not None or cell is not None or merged:
        best = None if best == "mean" else best
    run = RunFolder(run_dir)
    store = run.store
    sel = select(store.path, best=best, archive=archive, cell=cell, merged=merged)
    out = Path(out)
    _prepare_out(out, overwrite)
    token = hub_token() if push_to_hub else None
    cfg = store.config()
    genome_path = store.genome_path(sel.genome)
    # a missing, malformed, oversized or non-finite genome names its file before any loading
    store.check_genome(sel.genome, deltas=True)
    with StopSignals():  # SIGTERM / SIGINT: the staging folder is removed, nothing is left at out
        try:
            write_model(run, sel, genome_path, out, max_shard_size=max_shard_size, dense=dense)
        except RunInterrupted as e:
            raise RunInterrupted(e.signum) from None
    if push_to_hub:
        push_folder(out, push_to_hub, private=private, token=token,
                    message=f"Upload {sel.genome} from CycleQD run {cfg.name} (cycleqd export)")
    return out


def _adapter_of(cfg, genome_path: Path, shape=None):
    """The genome as a child adapter when the run's experts are LoRA and the genome is low rank, else None."""
    from cycleqd.model.adapters import expert_kind

    if expert_kind(cfg) != "lora":
        return None
    import torch

    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import Genome
    from cycleqd.model.lora import child_adapter

    genome = Genome.load(genome_path, shape)
    if genome.terms:
        return None
    adapter = child_adapter(genome, Factors.prepare(cfg, device="cpu", progress=False))
    for name, (B, A) in adapter.modules.items():
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
            raise RunDamaged(genome_path, f"the adapter's {name} is not finite")
    return adapter


def write_model(run: RunFolder, sel: Selection, genome_path: Path, out: Path, *,
                max_shard_size: str | int = "5GB", dense: bool = False) -> Path:
    """Materialise ``genome_path`` over the run's base and write the model folder ``out`` (see :func:`export`).

    Everything goes to a sibling temp folder first and is renamed into place.
    """
    store = run.store
    cfg = store.config()
    from transformers import AutoTokenizer, GenerationConfig

    adapter = None if dense else _adapter_of(cfg, genome_path, store.genome_shape())
    engine = _materialized_engine(cfg, genome_path, store.genome_shape()) if adapter is None else None
    tokenizer = AutoTokenizer.from_pretrained(cfg.models.base, revision=cfg.models.revision)
    try:
        gen_cfg = GenerationConfig.from_pretrained(cfg.models.base, revision=cfg.models.revision)
    except OSError:
        gen_cfg = None  # the base has no generation_config.json; keep the one derived from its config
    tree = run.lineage(sel.genome)
    tasks = cfg.task_names

    # Everything goes to a sibling temp folder first, so a failure leaves no half export.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if adapter is None:
            engine.save(tmp, max_shard_size=max_shard_size, generation_config=gen_cfg)
        else:
            from cycleqd.model.lora import save_adapter

            save_adapter(adapter, tmp, base_model=cfg.models.base)
        tokenizer.save_pretrained(tmp)
        (tmp / "cycleqd").mkdir()
        shutil.copyfile(genome_path, tmp / "cycleqd" / "genome.safetensors")
        shutil.copyfile(store.path / store.CONFIG, tmp / "cycleqd" / layout.CONFIG)
        provenance = {
            "run": str(store.path.resolve()), "genome": sel.genome, "how": sel.how, "generation": sel.generation,
            "scores": sel.scores, "tasks": tasks, "lineage": tree,
        }
        (tmp / "cycleqd" / "export.json").write_text(json.dumps(provenance, indent=1))
        base_meta = base_card_metadata(cfg.models.base, cfg.models.revision)
        (tmp / "README.md").write_text(model_card(cfg, sel, cfg.name, tree, base_meta, tasks,
                                                  adapter=adapter is not None))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        # a second SIGTERM / SIGINT waits until the staging folder is gone
        held = signal.pthread_sigmask(signal.SIG_BLOCK, StopSignals.SIGNALS)
        try:
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    return out


def _adapter_rank(folder: Path) -> int | None:
    """The rank of the PEFT adapter in ``folder``, or None if it holds full weights."""
    cfg = folder / "adapter_config.json"
    return int(json.loads(cfg.read_text())["r"]) if cfg.is_file() else None


def _copy_base(cfg, dst: Path) -> None:
    """The run's base model folder (config, weights, tokenizer), copied to ``dst`` (Hub ids resolved)."""
    from cycleqd.model.experts import resolve_model_dir

    src = resolve_model_dir(cfg.models.base, cfg.models.revision)
    shutil.copytree(src, dst, symlinks=False, ignore=shutil.ignore_patterns(".*", "cycleqd"))


def export_team(run_dir: str | Path, team_file: str | Path, *, out: str | Path, push_to_hub: str | None = None,
                private: bool = False, max_shard_size: str | int = "5GB") -> Path:
    """Write a team (``cycleqd team``'s team.json) as one folder: a model folder per member under
    ``members/<genome>/`` (each what :func:`export` writes), ``team.json`` with each member's folder,
    and a README saying how to serve the team. With LoRA experts every member is a PEFT adapter and
    the folder holds the base once (``base/``); the README says how to serve all members with vLLM's
    multi-LoRA. Pushed as one Hub repo with ``push_to_hub``.

    Raises:
        ConfigError: no run, not a team file, a member genome missing, ``out`` not empty, or no
            Hub token; before anything is written.
    """
    from cycleqd.studies.team import TEAM_FILE, read_team

    run = RunFolder(run_dir)
    team = read_team(team_file)
    record = json.loads((Path(team_file) / TEAM_FILE if Path(team_file).is_dir() else Path(team_file)).read_text())
    if list(team.tasks) != run.tasks:
        raise ConfigError(f"--team: the team's tasks {list(team.tasks)} are not the run's {run.tasks}")
    here = Path(team_file).parent if not Path(team_file).is_dir() else Path(team_file)
    paths = {}
    for m in team.members:  # the run's genome, else the copy beside team.json
        copy = here / "genomes" / f"{m.genome}.safetensors"
        paths[m.genome] = run.store.genome_path(m.genome) if run.store.genome_path(m.genome).is_file() else copy
        if not paths[m.genome].is_file():
            raise ConfigError(f"--team: member genome {m.genome!r} is neither in {run.path} nor beside the team file")
    out = Path(out)
    _prepare_out(out, False)
    token = hub_token() if push_to_hub else None
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    # SIGTERM / SIGINT: the staging folder is removed, nothing is left at out
    with StopSignals():
        try:
            for m in team.members:
                roles = [f"{'router' if team.plan[t]['router'] == m.genome else 'voter'} of {t}" for t in team.tasks
                         if m.genome in team.plan[t].get("voters", [team.plan[t]["router"]])]
                sel = Selection(m.genome, dict(m.scores), f"member of a {team.strategy} team ({', '.join(roles)})")
                write_model(run, sel, paths[m.genome], stage / "members" / m.genome, max_shard_size=max_shard_size)
            record = {**record, "members": [{**mm, "folder": f"members/{mm['genome']}"} for mm in record["members"]]}
            ranks = [_adapter_rank(stage / "members" / m.genome) for m in team.members]
            if all(r is not None for r in ranks):  # every member an adapter: one base beside them
                from cycleqd.engine.vllm import lora_options

                _copy_base(run.config, stage / "base")
                record["adapters"] = {"base": "base", "rank": max(ranks),
                                      "max_lora_rank": lora_options(max(ranks), len(ranks))["max_lora_rank"]}
            (stage / TEAM_FILE).write_text(json.dumps(record, indent=1))
            (stage / "README.md").write_text(team_card(record, run.config.name))
            os.chmod(stage, 0o755)
            if out.exists():
                out.rmdir()  # _prepare_out let only an empty folder through
            stage.rename(out)
        except BaseException as e:
            held = signal.pthread_sigmask(signal.SIG_BLOCK, StopSignals.SIGNALS)
            try:
                shutil.rmtree(stage, ignore_errors=True)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            if isinstance(e, RunInterrupted):
                raise RunInterrupted(e.signum) from None
            raise
    if push_to_hub:
        push_folder(out, push_to_hub, private=private, token=token,
                    message=f"Upload a {team.strategy} team from CycleQD run {run.config.name} (cycleqd export)")
    return out
