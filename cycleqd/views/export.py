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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from cycleqd.config import ConfigError, looks_like_hub_id
from cycleqd.registry import did_you_mean
from cycleqd.runs import layout
from cycleqd.runs.folder import ArchiveSnapshot, RunFolder, best_by_mean

__all__ = ["Selection", "export", "select", "parse_cell"]

CARD_TAGS = ["merge", "cycleqd", "model-merging", "evolutionary-model-merging"]


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


def _hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ConfigError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def _base_card_metadata(base: str, revision: str | None) -> dict[str, Any]:
    """YAML metadata of the base model's own card (local folder, else the Hub when reachable)."""
    path = Path(base) / "README.md"
    text = None
    if path.is_file():
        text = path.read_text(errors="replace")
    elif not Path(base).exists():
        try:
            from huggingface_hub import hf_hub_download

            text = Path(hf_hub_download(base, "README.md", revision=revision)).read_text(errors="replace")
        except Exception:  # offline or no card: the export does not need it
            text = None
    if not text or not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _is_hub_id(s: str) -> bool:
    return not Path(s).exists() and looks_like_hub_id(s)


def _tree_text(node: dict, depth: int = 0) -> list[str]:
    note = " (see above)" if node["repeat"] else (" (older ancestors not shown)" if node["cut"] else "")
    lines = [f"{'  ' * depth}- `{node['id']}`{note}"]
    for p in node["parents"]:
        lines += _tree_text(p, depth + 1)
    return lines


def model_card(cfg, sel: Selection, run_name: str, tree: dict, base_meta: dict, tasks: list[str]) -> str:
    """README.md text: YAML metadata, scores, how the model was made, lineage."""
    meta: dict[str, Any] = {}
    if _is_hub_id(cfg.models.base):
        meta["base_model"] = cfg.models.base
    elif isinstance(base_meta.get("base_model"), (str, list)):
        meta["base_model"] = base_meta["base_model"]
    meta["library_name"] = "transformers"
    if base_meta.get("license"):
        meta["license"] = base_meta["license"]
    meta["tags"] = list(CARD_TAGS)
    meta["pipeline_tag"] = "text-generation"

    scores = [sel.scores.get(t) for t in tasks]
    mean = sum(scores) / len(scores) if scores and all(s is not None for s in scores) else None
    rows = "\n".join(f"| {t} | {cfg.tasks[i].kind} | {'-' if s is None else f'{s:.4f}'} |"
                     for i, (t, s) in enumerate(zip(tasks, scores)))
    mean_row = f"| **mean** | | **{mean:.4f}** |" if mean is not None else ""
    generation = "-" if sel.generation is None else sel.generation
    experts = "\n".join(f"  - {t}: `{cfg.models.experts[t]}`" for t in tasks)
    evo = cfg.evolution
    cycle = (f"the quality task fixed to {evo.fixed_quality_task}" if evo.fixed_quality_task
             else f"the quality task rotating over {', '.join(tasks)} every {evo.flip_interval} generation(s)")
    body = f"""# {run_name}: `{sel.genome}`

A merge of expert fine-tunes of `{cfg.models.base}`, found by CycleQD (cyclic
quality-diversity evolutionary model merging, Kuroki et al., ICLR 2025) with
the cycleqd toolkit and exported as a plain transformers model.

Picked as: {sel.how}.

## Scores measured during the run

| task | kind | score |
|---|---|---|
{rows}
{mean_row}

## How it was made

- Base model: `{cfg.models.base}`
- Experts (one per task):
{experts}
- The model is theta = theta_base + sum_k a_k tau_k + sum_k U_k diag(d_k) V_k^T, where tau_k is
  expert k's task vector and U_k S_k V_k^T its SVD; the coefficients (the genome) were evolved with
  `{evo.crossover.name}` crossover (mu {evo.crossover.mu}, sigma {evo.crossover.sigma}), `{evo.mutation.name}`
  mutation (rate {evo.mutation.rate}) and `{evo.sampling.name}` parent sampling, {cycle}.
- Generation: {generation} of {evo.generations}; dtype {cfg.models.dtype}.
- `cycleqd/genome.safetensors` holds the genome, `cycleqd/config.yaml` the run's resolved config.

## Lineage

{chr(10).join(_tree_text(tree))}
"""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a file")
        if any(out.iterdir()) and not overwrite:
            raise ConfigError(f"--out {str(out)!r} exists and is not empty")
    elif out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out {str(out)!r}: parent is not a folder")


def _materialized_engine(cfg, genome_path: Path):
    """A transformers engine on the CPU in the run's dtype, with the genome streamed in as a worker does."""
    from cycleqd.config import EngineConfig
    from cycleqd.engine.hf import HFEngine
    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import Genome

    factors = Factors.prepare(cfg, device="cpu", progress=False)
    genome = Genome.load(genome_path)
    options = {"revision": cfg.models.revision} if cfg.models.revision else {}
    engine = HFEngine.from_path(cfg.models.base, EngineConfig(device="cpu", options=options), dtype=cfg.models.dtype)
    engine.load_genome(genome, factors)
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
) -> Path:
    """Write one model of a run as a Hugging Face folder at ``out`` (and optionally push it).

    Pick with ``best="mean"``, ``archive`` + ``cell`` (``"i,j"`` or ints), or
    ``merged=True`` (pass ``best=None`` with the other two). The folder holds
    ``config.json``, safetensors shards of at most ``max_shard_size``, the base's
    tokenizer and generation config, ``README.md`` (model card with YAML
    metadata) and ``cycleqd/`` (genome, resolved config, provenance JSON).

    Raises:
        ConfigError: no such run, bad selection (unknown archive, malformed, out of
            range or empty cell, no final merge), ``out`` not empty, or no Hub
            token for ``push_to_hub``; raised before anything is written.
    """
    if archive is not None or cell is not None or merged:
        best = None if best == "mean" else best
    run = RunFolder(run_dir)
    store = run.store
    sel = select(store.path, best=best, archive=archive, cell=cell, merged=merged)
    out = Path(out)
    _prepare_out(out, overwrite)
    token = _hub_token() if push_to_hub else None
    cfg = store.config()
    genome_path = store.genome_path(sel.genome)
    store.check_genome(sel.genome)  # a missing or truncated genome names its file before any loading
    write_model(run, sel, genome_path, out, max_shard_size=max_shard_size)
    if push_to_hub:
        push_folder(out, push_to_hub, private=private, token=token,
                    message=f"Upload {sel.genome} from CycleQD run {cfg.name} (cycleqd export)")
    return out


def write_model(run: RunFolder, sel: Selection, genome_path: Path, out: Path, *,
                max_shard_size: str | int = "5GB") -> Path:
    """Materialise ``genome_path`` over the run's base and write the model folder ``out`` (see :func:`export`).

    Everything goes to a sibling temp folder first and is renamed into place.
    """
    store = run.store
    cfg = store.config()
    from transformers import AutoTokenizer, GenerationConfig

    engine = _materialized_engine(cfg, genome_path)
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
        engine.save(tmp, max_shard_size=max_shard_size, generation_config=gen_cfg)
        tokenizer.save_pretrained(tmp)
        (tmp / "cycleqd").mkdir()
        shutil.copyfile(genome_path, tmp / "cycleqd" / "genome.safetensors")
        shutil.copyfile(store.path / store.CONFIG, tmp / "cycleqd" / layout.CONFIG)
        provenance = {
            "run": str(store.path.resolve()), "genome": sel.genome, "how": sel.how, "generation": sel.generation,
            "scores": sel.scores, "tasks": tasks, "lineage": tree,
        }
        (tmp / "cycleqd" / "export.json").write_text(json.dumps(provenance, indent=1))
        base_meta = _base_card_metadata(cfg.models.base, cfg.models.revision)
        (tmp / "README.md").write_text(model_card(cfg, sel, cfg.name, tree, base_meta, tasks))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_team(run_dir: str | Path, team_file: str | Path, *, out: str | Path, push_to_hub: str | None = None,
                private: bool = False, max_shard_size: str | int = "5GB") -> Path:
    """Write a team (``cycleqd team``'s team.json) as one folder: a model folder per member under
    ``members/<genome>/`` (each what :func:`export` writes), ``team.json`` with each member's folder,
    and a README saying how to serve the team. Pushed as one Hub repo with ``push_to_hub``.

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
    token = _hub_token() if push_to_hub else None
    out.mkdir(parents=True, exist_ok=True)
    for m in team.members:
        roles = [f"{'router' if team.plan[t]['router'] == m.genome else 'voter'} of {t}" for t in team.tasks
                 if m.genome in team.plan[t].get("voters", [team.plan[t]["router"]])]
        sel = Selection(m.genome, dict(m.scores), f"member of a {team.strategy} team ({', '.join(roles)})")
        write_model(run, sel, paths[m.genome], out / "members" / m.genome, max_shard_size=max_shard_size)
    record = {**record, "members": [{**mm, "folder": f"members/{mm['genome']}"} for mm in record["members"]]}
    (out / TEAM_FILE).write_text(json.dumps(record, indent=1))
    (out / "README.md").write_text(team_card(record, run.config.name))
    if push_to_hub:
        push_folder(out, push_to_hub, private=private, token=token,
                    message=f"Upload a {team.strategy} team from CycleQD run {run.config.name} (cycleqd export)")
    return out


_SERVING = {
    "router": """Send each request to the member of its task: `plan[task]["router"]` in team.json (the best elite
of that task's archive). Without a task label, score the request's prompt under each router member
(mean negative log-likelihood of the prompt tokens) and send it to the lowest; that is `router_nll`.""",
    "vote": """Send each request to every voter of its task (`plan[task]["voters"]`). Group the answers by what they
do: run each answer (the code on the prompt's own example, the query on its table, the command in a
sandbox; for agents, the action proposed this turn) and compare outputs. Return an answer of the
largest group; on a tie, the group holding the voter with the best score on that task.""",
    "moa": """Send each request to every proposer of its task (`plan[task]["voters"]`), then send it once more to the
aggregator (the first proposer) with the proposals in its prompt: as lines `proposal i: ...` before a
raw prompt, or listed at the end of the last user turn of a chat; its reply is the answer.""",
}


def team_card(record: dict, run_name: str) -> str:
    """README.md of an exported team: members, scores, and how to serve it."""
    tasks = record["tasks"]
    members = "\n".join(f"| `{m['genome']}` | {m['folder']} | " + " | ".join(f"{m['scores'].get(t, 0):.3f}"
                                                                          for t in tasks) + " |"
                        for m in record["members"])
    plan = "\n".join(f"- {t}: router `{p['router']}`" + (f", voters {', '.join(f'`{g}`' for g in p['voters'])}"
                                                         if p.get("voters") else "")
                     for t, p in record["plan"].items())
    scores = ""
    if record.get("scores"):
        rows = [(f"team {v}", s) for v, s in record["scores"].items()]
        if record.get("best_single"):
            rows.append((f"best single elite `{record['best_single']['genome']}`", record["best_single"]["scores"]))
        scores = ("\n## Scores (measured by `cycleqd team`)\n\n| model | " + " | ".join(tasks) + " | mean |\n|---|"
                  + "---|" * (len(tasks) + 1) + "\n" + "\n".join(
                      f"| {n} | " + " | ".join(f"{s[t]:.3f}" for t in tasks) + f" | {s['mean']:.3f} |"
                      for n, s in rows) + "\n")
    return f"""---
library_name: transformers
tags: [{', '.join(CARD_TAGS)}, model-team]
---

# {run_name}: a {record['strategy']} team of {len(record['members'])} CycleQD elites

Each folder under `members/` is a plain transformers model (its own README, genome and lineage).
`team.json` says who answers what (`plan`), and each member's scores in the run.

## How to serve it

{_SERVING[record['strategy']]}

All members share the base model: a server can keep one copy of the base and each member's weights,
or keep one model resident and load a member's weights into it when its turn comes (as `cycleqd team`
does), which costs one weight load per switch of member.

## Members

| genome | folder | {' | '.join(tasks)} |
|---|---|{'---|' * len(tasks)}
{members}

## Plan

{plan}
{scores}"""


def push_folder(folder: Path, repo_id: str, *, private: bool, token: str, message: str) -> str:
    """Create (or reuse) the Hub model repo ``repo_id`` and upload ``folder`` in one commit; returns its URL.

    Honours HF_ENDPOINT as set now (not only when huggingface_hub was imported).
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=message)
    return str(url)
