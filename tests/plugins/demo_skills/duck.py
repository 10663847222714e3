"""Upper: a task with only the protocol's shape (no Task base, no Options, no answer), as older packages wrote."""
import time

from cycleqd.engine.base import GenRequest
from cycleqd.tasks.base import SampleResult, TaskResult

WORDS = ["apple", "table", "river", "stone", "cloud", "green", "light", "sound"]


class Upper:
    """Upper a word."""

    executes_code = False

    def __init__(self, name="upper", data=None, sandbox=None, words=8):
        self.name = name
        self.words = WORDS[:words]

    def sample_ids(self):
        return [str(i) for i in range(len(self.words))]

    def evaluate(self, engine, ids=None):
        t0 = time.monotonic()
        ids = list(ids) if ids is not None else self.sample_ids()
        outs = engine.generate([GenRequest(messages=[{"role": "user", "content": f"sh: upper {self.words[int(i)]}"}],
                                           max_new_tokens=12) for i in ids])
        samples = tuple(SampleResult(id=i, score=float(o.strip() == self.words[int(i)].upper()))
                        for i, o in zip(ids, outs))
        return TaskResult(task=self.name, quality=sum(s.score for s in samples) / len(samples), n=len(samples),
                          samples=samples, seconds=time.monotonic() - t0)


class NotATask:
    """Has no evaluate: refused as a task kind."""
