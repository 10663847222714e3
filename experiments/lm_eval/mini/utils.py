"""process_results of the mini lm-eval tasks: the native mini task's check (see cycleqd.tasks.mini_lm_eval)."""
from cycleqd.tasks.mini_lm_eval import process_results  # noqa: F401
