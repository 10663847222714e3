"""MBPP / MBPP+ pass@1 (see :mod:`cycleqd.tasks.mbpp.task`): the task, its prompts, sanitisers and verdict jobs."""
from cycleqd.tasks.mbpp.problems import Problem, deserialize_inputs, entry_point_of, problem_from_row
from cycleqd.tasks.mbpp.programs import assert_job, base_calls_job, probe_call, probe_program, same_output
from cycleqd.tasks.mbpp.prompts import (
                                        ASSERTION_INTRO,
                                        EVALPLUS_INSTRUCTION,
                                        EVALPLUS_PREFILL,
                                        PREFILL,
                                        STOP,
                                        SYSTEM,
                                        evalplus_message,
                                        official_instruction,
                                        official_prompt,
                                        split_docstring,
)
from cycleqd.tasks.mbpp.sanitize import evalplus_v0_sanitize, extract_code, official_sanitize, sanitize
from cycleqd.tasks.mbpp.task import OFFICIAL_COUNT, MBPPOptions, MBPPTask

__all__ = ["ASSERTION_INTRO", "EVALPLUS_INSTRUCTION", "EVALPLUS_PREFILL", "MBPPOptions", "MBPPTask", "OFFICIAL_COUNT",
           "PREFILL", "STOP", "SYSTEM", "Problem", "assert_job", "base_calls_job", "deserialize_inputs",
           "entry_point_of", "problem_from_row", "evalplus_message", "evalplus_v0_sanitize", "extract_code", "official_instruction",
           "official_prompt", "official_sanitize", "probe_call", "probe_program", "same_output", "sanitize",
           "split_docstring"]
