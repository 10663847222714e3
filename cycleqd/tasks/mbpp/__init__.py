"""MBPP / MBPP+ pass@1 (see :mod:`cycleqd.tasks.mbpp.task`): the task, its prompts, sanitisers and verdict jobs."""
from cycleqd.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__, task="OFFICIAL_COUNT MBPPOptions MBPPTask",
    problems="Problem deserialize_inputs entry_point_of problem_from_row",
    programs="assert_job base_calls_job probe_call probe_program same_output",
    prompts="ASSERTION_INTRO EVALPLUS_INSTRUCTION EVALPLUS_PREFILL PREFILL STOP SYSTEM evalplus_message "
            "official_instruction official_prompt split_docstring",
    sanitizers="evalplus_v0_sanitize extract_code official_sanitize sanitize")
