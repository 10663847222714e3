"""The names of a run folder's files: their one home (the format is in docs/run_folder.md).

    RUN/config.yaml        the resolved config
    RUN/children.jsonl     the write-ahead log: one line per finished child
    RUN/seeds.json         the seed experts (generation 0)
    RUN/genomes/<id>.safetensors
    RUN/archives.json      snapshot of the archives (a cache of seeds + log)
    RUN/stats.jsonl        per-generation archive statistics (for plots)
    RUN/models.json        fingerprints of the base and experts
    RUN/growth.jsonl       tasks added by `cycleqd grow`
    RUN/final_merge.json   the paper's final merge
    RUN/summary.json       the run at a glance
    RUN/search.json        a coefficient search's state (cma_es, nsga2's front, random), a view of the log
    RUN/episodes/<id>.jsonl  an elite's passing conversations
    RUN/operator_control.jsonl  CMA-ES operator control's events (its name lives in
                           cycleqd.search.operator_control, a lower stage)
    RUN/plots/             heatmaps and history
    RUN/.lock              held by the one driver of the run
"""
from __future__ import annotations

CONFIG = "config.yaml"
CHILDREN = "children.jsonl"
SEEDS = "seeds.json"
GENOMES = "genomes"
ARCHIVES = "archives.json"
STATS = "stats.jsonl"
MODELS = "models.json"
GROWTH_LOG = "growth.jsonl"
FINAL = "final_merge.json"
SUMMARY = "summary.json"
SEARCH = "search.json"
EPISODES = "episodes"
PLOTS = "plots"
LOCK = ".lock"
QUARANTINE = "quarantine"
GENOME_SUFFIX = ".safetensors"


def genome_file(genome_id: str) -> str:
    """A genome's path relative to the run folder."""
    return f"{GENOMES}/{genome_id}{GENOME_SUFFIX}"
