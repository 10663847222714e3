"""Export: an elite of a real run becomes a plain HF folder with the run's exact weights,
and the Hub push speaks the Hub's HTTP protocol (to a local server)."""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import BINS, real_run

from cycleqd.config import ConfigError


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return real_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    from cycleqd.views.export import export

    return export(run, best="mean", out=tmp_path_factory.mktemp("exp") / "model")


def _snapshot(run: Path) -> dict:
    return json.loads((run / "archives.json").read_text())


def _best_mean(run: Path) -> dict:
    snap = _snapshot(run)
    elites = [e for t in snap["tasks"] for e in snap["archives"][t]["elites"]]
    return max(elites, key=lambda e: sum(e["scores"].values()) / len(e["scores"]))


def _logits_in_run(run: Path, genome_id: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the model as a run worker builds it: the base engine model with the genome written in."""
    from cycleqd.engine.hf import HFEngine
    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import materialize
    from cycleqd.runs.store import RunStore

    store = RunStore(run)
    cfg = store.config()
    engine = HFEngine.from_path(cfg.models.base, cfg.engine, dtype=cfg.models.dtype)
    materialize(store.load_genome(genome_id), Factors.prepare(cfg, progress=False), into=engine.model.state_dict())
    with torch.no_grad():
        return engine.model(ids).logits


def _input_ids(folder: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)("select x from t; ls -la", return_tensors="pt").input_ids


def test_export_is_a_plain_hf_folder_with_a_model_card(exported, run):
    from transformers import AutoModelForCausalLM

    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            "cycleqd"} <= names
    assert not [n for n in names if n.startswith(".")]
    best = _best_mean(run)
    card = (exported / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---", 2)[1])
    assert {"merge", "cycleqd"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
    assert best["genome"] in card
    for t, s in best["scores"].items():
        assert f"| {t} | likelihood | {s:.4f} |" in card
    prov = json.loads((exported / "cycleqd" / "export.json").read_text())
    assert prov["genome"] == best["genome"] and prov["scores"] == best["scores"]
    assert (exported / "cycleqd" / "genome.safetensors").read_bytes() == (
        run / "genomes" / f"{best['genome']}.safetensors").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.config.architectures == ["LlamaForCausalLM"]


def test_exported_logits_equal_the_runs_model(exported, run):
    from transformers import AutoModelForCausalLM

    ids = _input_ids(exported)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(exported).eval()(ids).logits
    want = _logits_in_run(run, _best_mean(run)["genome"], ids)
    assert torch.equal(got, want)
    # and it is not simply the base model
    base = AutoModelForCausalLM.from_pretrained(yaml.safe_load((run / "config.yaml").read_text())["models"]["base"])
    with torch.no_grad():
        assert not torch.equal(base.eval()(ids).logits, got)


def test_exported_model_rescores_the_same(exported, run):
    from cycleqd.engine.hf import HFEngine
    from cycleqd.evolve.worker import build_tasks
    from cycleqd.runs.store import RunStore

    cfg = RunStore(run).config()
    engine = HFEngine.from_path(str(exported), cfg.engine)
    scores = {name: task.evaluate(engine).quality for name, task in build_tasks(cfg).items()}
    assert scores == pytest.approx(_best_mean(run)["scores"], rel=1e-5, abs=0)


def test_export_cell_and_merged_and_shards(run, tmp_path):
    from transformers import AutoModelForCausalLM

    from cycleqd.views.export import export

    snap = _snapshot(run)
    task = snap["tasks"][1]
    elite = max(snap["archives"][task]["elites"], key=lambda e: e["quality"])
    cell = ",".join(map(str, elite["cell"]))
    out = export(run, best=None, archive=task, cell=cell, merged=False, out=tmp_path / "cell",
                 max_shard_size="60KB")
    assert json.loads((out / "cycleqd" / "export.json").read_text())["genome"] == elite["genome"]
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    ids = _input_ids(out)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(got, _logits_in_run(run, elite["genome"], ids))

    final = json.loads((run / "final_merge.json").read_text())
    out = export(run, best=None, merged=True, out=tmp_path / "merged")
    assert json.loads((out / "cycleqd" / "export.json").read_text())["genome"] == final["genome"]
    card = (out / "README.md").read_text()
    assert "final merge" in card


@pytest.mark.parametrize("kwargs, needle", [
    ({"archive": "zz", "cell": "0,0"}, "no such archive"),
    ({"archive": "a", "cell": "a,b"}, "integers"),
    ({"archive": "a", "cell": "1"}, "2 axes"),
    ({"archive": "a", "cell": f"0,{BINS['count']}"}, "out of range"),
    ({"archive": "a", "cell": "-1,0"}, "out of range"),
    ({"archive": "a", "cell": None}, "go together"),
    ({"best": "median"}, "only 'mean'"),
])
def test_bad_selection_is_bad_input_and_writes_nothing(run, tmp_path, kwargs, needle):
    from cycleqd.views.export import export

    args = {"best": None, **kwargs}
    with pytest.raises(ConfigError, match=needle):
        export(run, out=tmp_path / "out", merged=False, **args)
    assert list(tmp_path.iterdir()) == []


def test_empty_cell_no_run_busy_out_are_bad_input(run, tmp_path):
    from cycleqd.views.export import export

    snap = _snapshot(run)
    full = {tuple(e["cell"]) for e in snap["archives"]["a"]["elites"]}
    empty = next((i, j) for i in range(BINS["count"]) for j in range(BINS["count"]) if (i, j) not in full)
    with pytest.raises(ConfigError, match="empty"):
        export(run, best=None, archive="a", cell=empty, out=tmp_path / "o")
    with pytest.raises(ConfigError, match="not a cycleqd run"):
        export(tmp_path / "no_run", out=tmp_path / "o")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        export(run, out=busy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_push_without_token_is_bad_input(run, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from cycleqd.views.export import export

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    with pytest.raises(ConfigError, match="token"):
        export(run, out=tmp_path / "o", push_to_hub="me/model")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# A local stand-in for the Hub: the endpoints create_repo + upload_folder call, with LFS basic transfer.


class _Hub(BaseHTTPRequestHandler):
    state: dict = {}

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, obj: dict | None, code: int = 200) -> None:
        raw = json.dumps(obj).encode() if obj is not None else b""
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_PUT(self) -> None:
        s = self.state
        body = self._body()
        if self.path.startswith("/lfs-upload/"):
            s["lfs"][self.path.rsplit("/", 1)[1]] = body
            return self._send(None)
        s["unknown"].append(("PUT", self.path))
        self._send({"error": "not found"}, 404)

    def do_POST(self) -> None:
        s = self.state
        body = self._body()
        s["auth"].add(self.headers.get("Authorization"))
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            req = json.loads(body)
            s["create"].append(req)
            return self._send({"url": f"{base}/{req['organization']}/{req['name']}"})
        if path == "/api/validate-yaml":
            s["validated"].append(json.loads(body)["content"])
            return self._send({"errors": [], "warnings": []})
        if path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._send({"files": [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                 "shouldIgnore": False, "oid": None} for f in files]})
        if path.endswith(".git/info/lfs/objects/batch"):
            req = json.loads(body)
            s["lfs_batch"].append(req)
            return self._send({"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"{base}/lfs-upload/{o['oid']}", "header": {}}}}
                for o in req["objects"]]})
        if path.startswith("/api/models/") and "/commit/" in path:
            repo = path[len("/api/models/"):].split("/commit/")[0]
            lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
            files = {}
            for item in lines[1:]:
                v = item["value"]
                if item["key"] == "file":
                    files[v["path"]] = base64.b64decode(v["content"])
                elif item["key"] == "lfsFile":
                    data = s["lfs"][v["oid"]]
                    assert hashlib.sha256(data).hexdigest() == v["oid"] and len(data) == v["size"]
                    files[v["path"]] = data
            s["commits"].append({"repo": repo, "summary": lines[0]["value"]["summary"], "files": files})
            return self._send({"commitUrl": f"{base}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40,
                               "pullRequestUrl": None})
        s["unknown"].append(("POST", self.path))
        self._send({"error": "not found"}, 404)

    def do_GET(self) -> None:
        self.state["unknown"].append(("GET", self.path))
        self._send({"error": "not found"}, 404)

    do_HEAD = do_GET


@pytest.fixture
def local_hub(monkeypatch):
    import huggingface_hub.constants as hc

    _Hub.state = {"create": [], "validated": [], "lfs_batch": [], "lfs": {}, "commits": [], "auth": set(),
                  "unknown": []}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    # The Xet storage protocol needs Hugging Face's CAS service; users without it set HF_HUB_DISABLE_XET=1
    # and huggingface_hub uses plain LFS uploads, which the local server implements.
    monkeypatch.setattr(hc, "HF_HUB_DISABLE_XET", True)
    yield _Hub.state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_push_to_hub_uploads_the_folder(run, tmp_path, local_hub):
    from cycleqd.views.export import export

    out = export(run, out=tmp_path / "model", push_to_hub="someone/cycleqd-tiny", private=True,
                 max_shard_size="60KB")
    hub = local_hub
    assert hub["unknown"] == []
    assert hub["create"] == [{"name": "cycleqd-tiny", "organization": "someone", "visibility": "private",
                              "type": "model"}]
    assert hub["auth"] == {"Bearer hf_local_test_token"}
    assert len(hub["commits"]) == 1
    commit = hub["commits"][0]
    assert commit["repo"] == "someone/cycleqd-tiny"
    best = _best_mean(run)
    assert commit["summary"] == f"Upload {best['genome']} from CycleQD run test-abc (cycleqd export)"
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert commit["files"] == local  # every file, byte for byte
    shards = [p for p in local if p.endswith(".safetensors") and not p.startswith("cycleqd/")]
    assert len(shards) >= 2
    uploaded_by_lfs = {o["oid"] for b in hub["lfs_batch"] for o in b["objects"]}
    assert uploaded_by_lfs == {hashlib.sha256(local[p]).hexdigest() for p in local if p.endswith(".safetensors")}
    assert set(hub["validated"]) == {local["README.md"].decode()}  # the card's YAML is checked before upload


def test_push_public_repo(run, tmp_path, local_hub):
    from cycleqd.views.export import export

    export(run, best=None, merged=True, out=tmp_path / "m", push_to_hub="org/merged", private=False)
    assert local_hub["create"][0]["visibility"] == "public"
    assert local_hub["commits"][0]["repo"] == "org/merged"


def test_card_metadata_takes_license_from_the_base_card(run, tmp_path):
    from cycleqd.runs.store import RunStore
    from cycleqd.views.card import base_card_metadata, model_card
    from cycleqd.views.export import Selection
    from cycleqd.views.report import lineage

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/original\n---\n# a base\n")
    meta = base_card_metadata(str(base), None)
    assert meta == {"license": "apache-2.0", "base_model": "org/original"}
    cfg = RunStore(run).config()
    tasks = cfg.task_names
    sel = Selection("g000001", {t: 0.5 for t in tasks}, "test pick", 1)
    card = model_card(cfg, sel, "r", lineage("g000001", {}), meta, tasks)
    head = yaml.safe_load(card.split("---", 2)[1])
    assert head["license"] == "apache-2.0" and head["base_model"] == "org/original"
    assert "| **mean** | | **0.5000** |" in card
    hub_cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={"base": "meta-llama/Llama-3-8B"})})
    head = yaml.safe_load(model_card(hub_cfg, sel, "r", lineage("g000001", {}), {}, tasks).split("---", 2)[1])
    assert head["base_model"] == "meta-llama/Llama-3-8B" and "license" not in head
