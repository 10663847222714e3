"""fishfarm's pickled OS problems (samples.pkl) read with the restricted unpickler: the official
code's 110 problems with its own words, and nothing but fishfarm's two classes resolved."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from oracles import OSOracleEngine

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.protocol import GenRequest
from cycleqd.sandbox import bwrap_available
from cycleqd.sandbox.os_rootfs import image_root
from cycleqd.tasks.fishfarm_os import read_samples, samples_file
from cycleqd.tasks.os_interaction import OFFICIAL_PROMPT, OSEpisode, OSInteractionTask

#: ``self._task_ids`` of the official code's ``tasks/agentbench_os.py`` (SakanaAI/CycleQD 3d14971).
OFFICIAL_IDS = [
    1, 2, 3, 4, 5, 7, 8, 11, 12, 13, 15, 16, 17, 19, 21, 22, 23, 24, 25, 26, 27, 28, 34, 35, 36, 39, 40, 42, 43,
    44, 45, 46, 49, 50, 51, 52, 54, 57, 60, 61, 63, 66, 75, 76, 77, 78, 79, 83, 84, 88, 89, 90, 92, 93, 94, 96, 97,
    99, 101, 102, 103, 105, 108, 109, 111, 115, 116, 117, 118, 119, 123, 124, 128, 129, 132, 133, 135, 136, 137,
    138, 139, 140, 141, 142, 144, 145, 146, 147, 148, 149, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 160,
    161, 162, 163, 164, 165, 166, 167, 168, 169,
]


@pytest.fixture(scope="module")
def samples_pkl(shared_data) -> Path:
    path = shared_data / "official/fishfarm/os_interaction/configs/samples.pkl"
    if not path.is_file():
        pytest.skip(f"fishfarm's samples.pkl is not at {path}")
    return path


def test_data_may_name_the_file_or_the_folders_above(samples_pkl) -> None:
    for data in (samples_pkl, samples_pkl.parent, samples_pkl.parent.parent):
        assert samples_file(str(data)) == samples_pkl
    assert samples_file(str(samples_pkl.parent.parent.parent)) is None


def test_official_selection_and_texts_are_the_official_codes(samples_pkl) -> None:
    """select: official picks the official code's 110 sample ids; under official each episode starts
    with the pickled conversation itself, which is fishfarm's prompt + one-shot + the pickled description
    (the words of 7/2023-06-07-00-13-14.json, not today's bootstrap.json)."""
    samples = read_samples(samples_pkl)
    assert len(samples) == 170 and [s.position for s in samples] == list(range(170))
    task = OSInteractionTask(data=str(samples_pkl), select="official")
    assert task.sample_ids() == [str(i) for i in OFFICIAL_IDS]
    by_id = {p.id: p for p in task.problems}
    old_file = 0
    for i in OFFICIAL_IDS:
        s, p = samples[i], by_id[str(i)]
        ep = OSEpisode(p, None, 5, 10.0, OFFICIAL_PROMPT, "official", p.extra["conversation"])
        assert ep.messages == [dict(m) for m in s.conversation]
        assert s.conversation[0]["content"].startswith(OFFICIAL_PROMPT)
        assert s.conversation[-1]["content"].endswith("My problem is:\n\n" + s.config["description"])
        built = OSEpisode(p, None, 5, 10.0, OFFICIAL_PROMPT, "official")  # the same words built from the parts
        assert built.messages == ep.messages
        old_file += s.file == "7/2023-06-07-00-13-14.json"
    assert old_file == 47
    agentbench = OSInteractionTask(data=str(samples_pkl), select="official", protocol="agentbench")
    assert agentbench.problems[1].description == by_id["1"].description


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class _Other:
    pass


def test_any_other_global_is_refused_with_one_line(tmp_path) -> None:
    """os.system, a builtin, a class of another module, fishfarm's module with another name, and
    a persistent id are all refused before anything is called: one line naming the file."""
    marker = tmp_path / "ran"
    cases = {
        "system": b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
        "builtin": b"c__builtin__\neval\n(S'1'\ntR.",
        "other": pickle.dumps([_Other()]),
        "near": b"cfishfarm.tasks.os_interaction\nContainer\n)R.",
        "persistent": b"(lP0\na.",
        "not samples": pickle.dumps({"a": 1}),
    }
    for name, data in cases.items():
        path = _write(tmp_path / f"{name.replace(' ', '_')}.pkl", data)
        with pytest.raises(ConfigError) as e:
            read_samples(path)
        msg = str(e.value)
        assert str(path) in msg and "\n" not in msg, (name, msg)
    assert not marker.exists()


def test_allowed_class_called_with_arguments_is_refused(tmp_path) -> None:
    """An allowed class is only ever built empty and given a dict state: REDUCE with arguments fails."""
    _write(tmp_path / "samples.pkl",
           b"(cfishfarm.tasks.os_interaction\nOSInteractionSample\n(S'x'\ntRl.")
    with pytest.raises(ConfigError, match="samples.pkl"):
        OSInteractionTask(data=str(tmp_path))


#: Cannot pass offline, or not at all (its own check is broken, in AgentBench too). They count as
#: failures in the figure below; every other problem must pass on the image.
UNPASSABLE = {"52": "init runs apt install sudo (network)", "153": 'dev 8: size-match.py int("4.0")'}
#: Pass or fail by chance, here as in Docker: the answer counts processes named bash while its own
#: pipeline runs, and the pipeline's forks that have not yet become grep / wc are counted too (3 to 5).
RACY = {"57": "ps -ef | grep -i bash | grep -v grep | wc -l"}


class _OfficialOracle(OSOracleEngine):
    """The known-correct player, answering with what the example printed when its check may read it."""

    def _reply(self, r: GenRequest) -> str:
        reply = super()._reply(r)
        p = self.problems[r.sample_id]
        last = r.messages[-1]["content"]
        if r.turn >= 1 and reply.endswith("Act: finish") and p.check and p.check[0] is not None \
                and last.startswith("The output of the OS:"):
            return f"Think: the OS told me.\n\nAct: answer({last.removeprefix('The output of the OS:').strip()})"
        return reply


@pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")
def test_the_110_official_problems_pass_with_their_examples_and_fail_wrong_answers(samples_pkl) -> None:
    """The official selection read from samples.pkl, played by its own example scripts on the OS image:
    all 110 together score >= 0.97 with nothing left out (only the network-bound and the broken-check
    problem fail, and the one whose answer is a race may), and wrong answers pass at most 1%."""
    if image_root("default") is None:
        pytest.skip("the OS image is not built here (make os-image); the host layer cannot hold these problems")
    # commands get a minute (not the task's 10 s): on a loaded machine a cut command is not the harness's fault
    task = OSInteractionTask(data=str(samples_pkl), select="official", command_timeout=60,
                             sandbox=SandboxConfig(allow_code_execution=True))
    good = task.evaluate(_OfficialOracle(task.problems))
    failed = set(good.failed_ids)
    print(f"official OS oracle from samples.pkl: {good.quality:.4f} of {good.n}; failed {sorted(failed, key=int)}")
    for s in good.samples:  # what went wrong, for a failure outside the known ones
        if s.id in failed - set(UNPASSABLE):
            run = s.detail["runs"][0]
            print(s.id, s.error, run.get("status"), repr(run.get("answer")), run.get("timeouts"),
                  [m["content"][-300:] for m in run.get("conversation", [])[-2:]])
    assert good.n == 110 and failed <= set(UNPASSABLE) | set(RACY), failed - set(UNPASSABLE) - set(RACY)
    assert good.quality >= 0.97
    wrong = task.evaluate(OSOracleEngine(task.problems, wrong=True))
    print(f"wrong answers: {wrong.quality:.4f} (passed {[s.id for s in wrong.samples if s.score > 0]})")
    assert wrong.quality <= 0.01
