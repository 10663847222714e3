"""Known-correct "models" for the real tasks: engines that answer from the data's own solutions.

They are real engines (they read the conversation they are given and answer it), used to
show a task scores correct behaviour as correct and wrong behaviour as wrong.
"""
from __future__ import annotations

from typing import Sequence

from cycleqd.engine.protocol import GenRequest
from cycleqd.tasks.os_interaction import OSProblem


class OSOracleEngine:
    """Plays each OS problem with its ``example`` script, then answers with what the OS printed.

    ``match`` problems are answered with the expected string; check chains without an
    example answer step (e.g. "implement a command") run the example and finish, unless
    it printed something, which is then the answer (their checks may read it).
    """

    def __init__(self, problems: Sequence[OSProblem], wrong: bool = False):
        self.problems = {p.id: p for p in problems}
        self.wrong = wrong

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        return [self._reply(r) for r in requests]

    def _reply(self, r: GenRequest) -> str:
        if self.wrong:
            return "Think: I guess.\n\nAct: answer(certainly wrong 1234)"
        p = self.problems[r.sample_id]
        if p.match is not None:
            return f"Think: I know it.\n\nAct: answer({p.match.get('answer', '')})"
        if p.example is None:
            return "Think: nothing to run.\n\nAct: finish"
        if r.turn == 0:
            return f"Think: run the reference solution.\n\nAct: bash\n\n```bash\n{p.example[1]}\n```"
        last = r.messages[-1]["content"]
        out = last.removeprefix("The output of the OS:\n\n") if last.startswith("The output of the OS:") else ""
        if None not in (p.check or ()) and not out.strip():  # a task judged by its checks alone
            return "Think: done.\n\nAct: finish"
        # what the example printed (a task whose checks also read the answer: "move it, tell me where")
        return f"Think: the OS told me.\n\nAct: answer({out.strip()})"

    def load_weights(self, state: object) -> None:
        raise TypeError("oracle engine has no weights")
