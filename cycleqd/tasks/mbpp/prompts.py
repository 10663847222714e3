"""How the MBPP task asks: the official CycleQD prompt and the EvalPlus chat message."""
from __future__ import annotations

from cycleqd.tasks.mbpp.problems import Problem, split_docstring  # noqa: F401 (re-exported)

SYSTEM = ("You are an exceptionally intelligent coding assistant that consistently delivers accurate "
          "and reliable responses to user instructions.")
ASSERTION_INTRO = " Your code should satisfy the following assertion:"
PREFILL = "```python"
STOP = ("Instruction:", "Instruction", "Response:", "Response")
EVALPLUS_INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem "
                        "in a markdown code block:")
EVALPLUS_PREFILL = ("Below is a Python script with a self-contained function that solves the problem and passes "
                    "corresponding tests:\n```python\n")


# -- prompts ----------------------------------------------------------------------------------
def official_instruction(text: str, assertion: str) -> str:
    """The official user turn: text ending in a period, the assertion sentence, a python block."""
    text = text.strip()
    if not text.endswith("."):
        text += "."
    return f"{text}{ASSERTION_INTRO}\n```python\n{assertion.strip()}\n```"


def official_prompt(problem: Problem) -> str:
    """The full official prompt: system line, ``@@ Instruction:`` turn, ``@@ Response:`` + open python fence.

    The official code renders its MBPP chat template with ``add_generation_prompt`` (which ends
    in ``@@ Response:``) and appends the prefill directly, so no newline precedes the fence.
    """
    return (f"{SYSTEM}\n\n@@ Instruction:\n{official_instruction(problem.text, problem.assertion)}"
            f"\n\n@@ Response:{PREFILL}")


def evalplus_message(problem: Problem) -> str:
    """Today's EvalPlus instruction for a chat model, with the docstring prompt in a code block."""
    return f"{EVALPLUS_INSTRUCTION}\n```\n{problem.docstring.strip()}\n```"
