"""The model cards of exported models and teams: README.md with the Hub's YAML metadata, the scores,
the genome's lineage and how the model was made."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cycleqd.config import looks_like_hub_id

if TYPE_CHECKING:
    from cycleqd.views.export import Selection

CARD_TAGS = ["merge", "cycleqd", "model-merging", "evolutionary-model-merging"]


def base_card_metadata(base: str, revision: str | None) -> dict[str, Any]:
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


def model_card(cfg, sel: "Selection", run_name: str, tree: dict, base_meta: dict, tasks: list[str],
               adapter: bool = False) -> str:
    """README.md text: YAML metadata, scores, how the model was made, lineage (``adapter``: the
    folder is a PEFT LoRA adapter of the base, and the card says how to load it)."""
    meta: dict[str, Any] = {}
    if _is_hub_id(cfg.models.base):
        meta["base_model"] = cfg.models.base
    elif isinstance(base_meta.get("base_model"), (str, list)):
        meta["base_model"] = base_meta["base_model"]
    meta["library_name"] = "peft" if adapter else "transformers"
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
the cycleqd toolkit and exported as {_form(cfg, adapter)}.

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


def _form(cfg, adapter: bool) -> str:
    if not adapter:
        return "a plain transformers model"
    return (f"a PEFT LoRA adapter of `{cfg.models.base}` (the experts were LoRA adapters, so the\n"
            "merge is one exactly): load it with\n"
            f"`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{cfg.models.base}\"), folder)`,\n"
            "or serve it with vLLM's `enable_lora` and a `LoRARequest`; `cycleqd export --dense` writes full weights")


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


def _multi_lora(record: dict) -> str:
    """How to serve a team of adapters with vLLM's multi-LoRA (one base, every member an adapter)."""
    names = [m["genome"] for m in record["members"]]
    rank, n = record["adapters"]["max_lora_rank"], len(names)
    modules = " \\\n    ".join(f"{g}=./{m['folder']}" for g, m in zip(names, record["members"]))
    listed = ",\n    ".join(f'"{g}": LoRARequest("{g}", {i}, "{m["folder"]}")'
                             for i, (g, m) in enumerate(zip(names, record["members"]), 1))
    return f"""`base/` is the base model; each member under `members/` is a PEFT LoRA adapter of it (rank up to
{record['adapters']['rank']}). One vLLM server holds the base once and serves every member at once,
requests of different members in the same batch (multi-LoRA), with no weight switch:

```bash
vllm serve ./base --enable-lora --max-lora-rank {rank} --max-loras {n} \\
  --lora-modules {modules}
```

A request names its member as the model (`"model": "{names[0]}"` in the OpenAI API). In Python:

```python
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

llm = LLM("base", enable_lora=True, max_lora_rank={rank}, max_loras={n})
members = {{
    {listed},
}}
outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=256),
                    lora_request=[members[g] for g in who])  # who: the member of each prompt
```

In transformers, `PeftModel.from_pretrained(base, "members/<genome>", adapter_name=...)` loads one,
`load_adapter` the others, and `generate(..., adapter_names=[...])` mixes them in one batch."""


def team_card(record: dict, run_name: str) -> str:
    """README.md of an exported team: members, scores, and how to serve it (as adapters of one base
    with vLLM multi-LoRA when ``record["adapters"]`` says the members are LoRA adapters)."""
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
    if record.get("adapters"):
        library, what = "peft", ("Each folder under `members/` is a PEFT LoRA adapter of `base/` (its own README, genome "
                                 "and lineage).")
        shared = "\n### Serving the members with vLLM multi-LoRA\n\n" + _multi_lora(record)
    else:
        library, what = "transformers", ("Each folder under `members/` is a plain transformers model (its own README, "
                                         "genome and lineage).")
        shared = """All members share the base model: a server can keep one copy of the base and each member's weights,
or keep one model resident and load a member's weights into it when its turn comes (as `cycleqd team`
does), which costs one weight load per switch of member."""
    return f"""---
library_name: {library}
tags: [{', '.join(CARD_TAGS)}, model-team]
---

# {run_name}: a {record['strategy']} team of {len(record['members'])} CycleQD elites

{what}
`team.json` says who answers what (`plan`), and each member's scores in the run.

## How to serve it

{_SERVING[record['strategy']]}

{shared}

## Members

| genome | folder | {' | '.join(tasks)} |
|---|---|{'---|' * len(tasks)}
{members}

## Plan

{plan}
{scores}"""
