"""MBPP / MBPP+ pass@1 (see :mod:`cycleqd.tasks.mbpp.task`): the task, its prompts, sanitisers and test programs."""
from cycleqd.tasks.mbpp.problems import Problem, deserialize_inputs, entry_point_of, problem_from_row
from cycleqd.tasks.mbpp.programs import base_test_program, build_test_program, probe_call, probe_program
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
           "PREFILL", "STOP", "SYSTEM", "Problem", "base_test_program", "build_test_program", "deserialize_inputs",
           "entry_point_of", "problem_from_row", "evalplus_message", "evalplus_v0_sanitize", "extract_code", "official_instruction",
           "official_prompt", "official_sanitize", "probe_call", "probe_program", "sanitize", "split_docstring"]
