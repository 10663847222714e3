"""``kind: lm_eval``: one or more lm-evaluation-harness tasks as one cycleqd task (one archive axis).

The lm-eval tasks (built-in ones, or the user's own YAMLs under ``include_path``) are loaded
once per worker; their requests are built once (contexts do not depend on the model) and
answered by :class:`~cycleqd.engine.lm_eval.EngineLM` over the worker's engine, so a child costs
no model load. Each document's score is the chosen ``metric`` of lm-eval's own
``process_results`` (after the chosen ``filter``); a sample's id is ``<lm-eval task>/<doc id>``,
and quality is the mean over every document of every listed task.

Splits: ``split: val`` (evolution) reads ``evolution_split`` of each task's dataset, ``split:
test`` (the final table) ``final_split``. A task whose two splits share documents (same prompt
and target) is refused unless ``allow_overlap: true``, and then a warning names the overlap's size.

An example (a config's ``tasks:`` entry)::

    - name: math
      kind: lm_eval
      options: {tasks: [gsm8k], metric: exact_match, filter: flexible-extract, num_fewshot: 5,
                evolution_split: train, final_split: test, n: 200, seed: 0}
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.protocol import Engine
from cycleqd.registry import did_you_mean, register_task
from cycleqd.tasks.protocol import SampleResult, Task, TaskResult

log = logging.getLogger("cycleqd")


def task_manager(include_path: str | None, names: Sequence[str] = ()) -> Any:
    """lm-eval's TaskManager over ``include_path`` (and lm-eval's own tasks unless every one of
    ``names`` is found there: indexing those takes tens of seconds), where a YAML's relative
    ``data_files`` are read next to the YAML (else from the current folder, as lm-eval does)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if tm is None or not names or any(n not in tm.all_tasks for n in names):
        tm = TaskManager(include_path=include_path)
    factory = tm._factory
    load = factory._load_full_config

    def load_full_config(entry: Any, overrides: Any = None) -> dict:
        cfg = load(entry, overrides)
        yaml_path = getattr(entry, "yaml_path", None)
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if yaml_path and files:
            here = Path(yaml_path).parent

            def fix(p: Any) -> Any:
                if isinstance(p, str) and not os.path.isabs(p) and not Path(p).exists() and (here / p).exists():
                    return str(here / p)
                return [fix(x) for x in p] if isinstance(p, list) else p

            files = {k: fix(v) for k, v in files.items()} if isinstance(files, dict) else fix(files)
            cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": files}
        return cfg

    factory._load_full_config = load_full_config
    return tm


@register_task("lm_eval")
class LmEvalTask(Task):
    """lm-evaluation-harness tasks scored through the worker's engine (see the module docstring).

    ``executes_code`` is True: an lm-eval task's ``process_results`` may run model-written code
    (a code task, or the mini world's YAMLs, whose checks run in cycleqd's sandbox).
    """

    class Options(BaseModel):
        """The options of ``kind: lm_eval``.

        Attributes:
            tasks: lm-eval task, group or tag names (their documents form one axis).
            metric: the per-document metric that is the score (default: each task's first metric).
            filter: which of lm-eval's filter outputs is scored (default: the first, ``none`` without filters).
            num_fewshot: few-shot examples (default: each task's own).
            n: the first ``n`` documents (lm-eval's ``limit``), or ``n`` drawn with ``seed`` when it is set.
            seed: draws the ``n`` documents at random (a table's repeated draws).
            doc_ids: explicit document indices of the split (instead of ``n``).
            include_path: a folder of the user's own lm-eval task YAMLs (default: the task's ``data``).
            split: ``val`` (evolution), ``test`` (the final table) or ``train``.
            evolution_split / final_split: the dataset splits ``val`` / ``test`` read (default:
                the task's validation split, else its test split / the task's test split); also
                given as ``splits: {evolution: ..., final: ...}``.
            allow_overlap: score evolution and the final table on shared documents (warned).
            apply_chat_template, system_instruction, fewshot_as_multiturn: lm-eval's own chat options.
            max_gen_toks: the generation budget, instead of each task's ``max_gen_toks``.
        """

        model_config = ConfigDict(frozen=True, extra="forbid")
        renamed: ClassVar[dict[str, str]] = {"limit": "n", "task": "tasks", "system_prompt": "system_instruction",
                                             "chat_template": "apply_chat_template", "samples": "doc_ids"}

        tasks: list[str] = Field(min_length=1)
        metric: str | None = None
        filter: str | None = None
        num_fewshot: int | None = Field(None, ge=0, le=1000)
        n: int | None = Field(None, ge=1, le=10_000_000)
        seed: int | None = Field(None, ge=0)
        doc_ids: list[int] | None = None
        include_path: str | None = None
        split: Literal["train", "val", "test"] = "val"
        evolution_split: str | None = None
        final_split: str | None = None
        splits: dict[Literal["evolution", "final", "val", "test"], str] | None = None
        allow_overlap: bool = False
        apply_chat_template: bool = False
        system_instruction: str | None = None
        fewshot_as_multiturn: bool = False
        max_gen_toks: int | None = Field(None, ge=1, le=1 << 20)

        @field_validator("tasks", mode="before")
        @classmethod
        def _one(cls, v: Any) -> Any:
            return [v] if isinstance(v, str) else v

    executes_code: ClassVar[bool] = True

    def __init__(self, name: str, data: str | None = None, sandbox: SandboxConfig | None = None, **options: Any):
        super().__init__(name, data, sandbox, **options)
        o = self.options
        include = o.include_path or data
        tm = task_manager(str(Path(include).resolve()) if include else None, o.tasks)
        unknown = [t for t in o.tasks if t not in tm.all_tasks]
        if unknown:
            raise ConfigError(f"task {name} (lm_eval): unknown lm-eval task {unknown[0]!r}"
                              f"{did_you_mean(unknown[0], tm.all_tasks)}" + ("" if include else
                                                                             " (include_path names a folder of your own YAMLs)"))
        self.lm_tasks: dict[str, Any] = tm.load(list(o.tasks))["tasks"]
        self.docs: dict[str, list[int]] = {}  # lm-eval task -> the doc indices scored
        self.overlap: dict[str, int] = {}
        for tname, task in self.lm_tasks.items():
            if o.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=o.num_fewshot)
            if o.max_gen_toks is not None and task.OUTPUT_TYPE == "generate_until":
                task.set_config(key="generation_kwargs", value={"max_gen_toks": o.max_gen_toks}, update=True)
            splits = self._splits(tname, task)
            if o.metric is not None and o.metric not in task._metric_fn_list:
                raise ConfigError(f"task {name} (lm_eval): {tname} has no metric {o.metric!r}"
                                  f"{did_you_mean(o.metric, task._metric_fn_list)} "
                                  f"(metrics: {', '.join(task._metric_fn_list)})")
            self.overlap[tname] = self._overlap(task, splits["val"], splits["test"])
            task.set_config(key="test_split", value=splits[o.split])
            total = len(task.eval_docs)
            self.docs[tname] = self._pick(tname, total)
        shared = {t: k for t, k in self.overlap.items() if k}
        if shared:
            what = ", ".join(f"{k} document(s) of {t}" for t, k in shared.items())
            if not o.allow_overlap:
                raise ConfigError(f"task {name} (lm_eval): evolution and the final table would score the same "
                                  f"items ({what}); choose disjoint evolution_split / final_split, or set "
                                  "allow_overlap: true")
            log.warning("task %s (lm_eval): %s appear in both the evolution and the final split "
                        "(allow_overlap: true)", name, what)
        self._built: dict[str, dict[int, list[Any]]] | None = None

    # -- set-up --------------------------------------------------------------------------------
    def _splits(self, tname: str, task: Any) -> dict[str, str]:
        c, o = task.config, self.options
        given = o.splits or {}
        val = o.evolution_split or given.get("evolution") or given.get("val") or c.validation_split or c.test_split
        test = o.final_split or given.get("final") or given.get("test") or c.test_split or c.validation_split
        have = list(task.dataset.keys()) if hasattr(task, "dataset") and task.dataset is not None else []
        out = {"val": val, "test": test, "train": c.training_split or val}
        for which, split in out.items():
            if split is None or (have and split not in have):
                raise ConfigError(f"task {self.name} (lm_eval): {tname} has no split {split!r} for {which} "
                                  f"(splits: {', '.join(have) or 'none'})")
        return out

    def _overlap(self, task: Any, val: str, test: str) -> int:
        """Documents of the evolution split whose prompt and target also occur in the final split."""
        if val == test:
            return len(task.dataset[val])

        def keys(split: str) -> set[str]:
            task.set_config(key="test_split", value=split)
            return {hashlib.sha256(f"{task.doc_to_text(d)}\x00{task.doc_to_target(d)}".encode()).hexdigest()
                    for d in task.eval_docs}

        a, b = keys(val), keys(test)
        return len(a & b)

    def _pick(self, tname: str, total: int) -> list[int]:
        o = self.options
        if o.doc_ids is not None:
            bad = [i for i in o.doc_ids if not 0 <= i < total]
            if bad:
                raise ConfigError(f"task {self.name} (lm_eval): doc id {bad[0]} is not in {tname}'s "
                                  f"{total} documents")
            return sorted(set(o.doc_ids))
        if o.n is None or o.n >= total:
            return list(range(total))
        if o.seed is None:
            return list(range(o.n))
        return sorted(random.Random(o.seed).sample(range(total), o.n))

    def _requests(self, lm: Any) -> dict[str, dict[int, list[Any]]]:
        """Every document's lm-eval instances, built once (contexts do not depend on the model)."""
        if self._built is None:
            o, built = self.options, {}
            for tname, task in self.lm_tasks.items():
                ids = self.docs[tname]
                task.build_all_requests(samples=ids, apply_chat_template=o.apply_chat_template,
                                        system_instruction=o.system_instruction,
                                        fewshot_as_multiturn=o.fewshot_as_multiturn,
                                        chat_template=lm.apply_chat_template if o.apply_chat_template else None,
                                        tokenizer_name=lm.tokenizer_name if o.apply_chat_template else "")
                per_doc: dict[int, list[Any]] = {}
                for inst in task.instances:  # doc_id counts the chosen docs; ids maps it back
                    per_doc.setdefault(ids[inst.doc_id], []).append(inst)
                built[tname] = {d: sorted(v, key=lambda i: i.idx) for d, v in sorted(per_doc.items())}
            self._built = built
        return self._built

    # -- the protocol --------------------------------------------------------------------------
    def sample_ids(self) -> list[str]:
        return [f"{t}/{d}" for t in self.lm_tasks for d in self.docs[t]]

    def evaluate(self, engine: Engine, ids: Sequence[str] | None = None) -> TaskResult:
        return self.answer(engine, ids)()

    def answer(self, engine: Engine, ids: Sequence[str] | None = None) -> Callable[[], TaskResult]:
        """Answer every request now (one batched engine call per request type); the returned call runs
        lm-eval's filters and ``process_results`` (which may run sandboxed code) and gives the result.

        Raises:
            KeyError: an unknown sample id.
        """
        from cycleqd.engine.lm_eval import EngineLM

        if self.executes_code:
            from cycleqd.sandbox import require_code_execution

            require_code_execution(self.sandbox, self.name)
        start = time.perf_counter()
        lm = EngineLM(engine, batch_size=16)
        built = self._requests(lm)
        chosen = self.sample_ids() if ids is None else [str(i) for i in ids]
        known = set(self.sample_ids())
        for i in chosen:
            if i not in known:
                raise KeyError(f"task {self.name}: unknown sample id {i!r}")
        picked = [(s.rsplit("/", 1)[0], int(s.rsplit("/", 1)[1])) for s in chosen]
        instances = [inst for t, d in picked for inst in built[t][d]]
        by_type: dict[str, list[Any]] = {}
        for inst in instances:
            inst.resps = []
            by_type.setdefault(inst.request_type, []).append(inst)
        for kind, insts in by_type.items():
            for inst, out in zip(insts, getattr(lm, kind)(insts)):
                inst.resps.append(out)
        generation = time.perf_counter() - start

        def check() -> TaskResult:
            begin = time.perf_counter()
            samples = []
            for tname in self.lm_tasks:
                docs = [d for t, d in picked if t == tname]
                if docs:
                    samples += self._score(tname, docs)
            order = {s: k for k, s in enumerate(chosen)}
            samples.sort(key=lambda s: order[s.id])
            quality = sum(s.score for s in samples) / len(samples) if samples else 0.0
            return TaskResult(self.name, quality, len(samples), tuple(samples),
                              generation + time.perf_counter() - begin)

        return check

    def _score(self, tname: str, docs: list[int]) -> list[SampleResult]:
        task, built, o = self.lm_tasks[tname], self._built or {}, self.options
        insts = [inst for d in docs for inst in built[tname][d]]
        kept = task._instances
        task._instances = insts
        try:
            task.apply_filters()
        finally:
            task._instances = kept
        keys = list(built[tname][docs[0]][0].filtered_resps)
        key = o.filter if o.filter is not None else keys[0]
        if key not in keys:
            raise ValueError(f"task {self.name}: {tname} has no filter {key!r}{did_you_mean(key, keys)} "
                             f"(filters: {', '.join(keys)})")
        args = [(built[tname][d][0].doc, [r.filtered_resps[key] for r in built[tname][d]]) for d in docs]
        batched = getattr(task.config.process_results, "batched", None)
        if callable(batched):  # a hook that checks many documents at once (the mini world's)
            all_metrics = batched([a[0] for a in args], [a[1] for a in args])
        else:  # lm-eval's per-document hook; threads, since a check may wait on a process
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=8) as pool:
                all_metrics = list(pool.map(lambda a: task.process_results(*a), args))
        out = []
        for d, metrics in zip(docs, all_metrics):
            reqs = built[tname][d]
            metric = o.metric if o.metric is not None else next(iter(metrics))
            value = float(metrics[metric])
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"task {self.name}: metric {metric!r} of {tname} gave {value}, not a score in "
                                 "[0, 1]; choose a per-document metric such as acc or exact_match")
            answer = reqs[0].resps[0] if reqs[0].request_type == "generate_until" else None
            detail: dict[str, Any] = {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
            if answer is not None:
                detail["output"] = answer
                detail["conversation"] = [{"role": "user", "content": reqs[0].args[0]},
                                          {"role": "assistant", "content": answer}]
            out.append(SampleResult(f"{tname}/{d}", value, None, detail))
        return out
