"""Contract tests: the real huggingface_hub / datasets / transformers clients against localhub.

One server per module, seeded in-process in a temporary root. Every HfApi / download call gets
`endpoint=` and `token=` explicitly, so these tests do not depend on HF_ENDPOINT / HF_TOKEN in the
process; datasets and transformers (which read the endpoint from the environment at import) run in
subprocesses with their own environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import uuid
from pathlib import Path

# Must be set before huggingface_hub is imported: newer clients push LFS files through Xet otherwise.
os.environ["HF_HUB_DISABLE_XET"] = "1"

import huggingface_hub  # noqa: E402
import pytest  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub import constants as hf_constants  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from localhub.seed import seed  # noqa: E402
from localhub.server import LocalHub  # noqa: E402
from localhub.store import git_blob_sha1  # noqa: E402

MODEL = "tinylabs/tiny-llama"
DATASET = "tinylabs/tiny-instruct"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    # If another module imported huggingface_hub before the env var was set, its constant is stale.
    old_xet = hf_constants.HF_HUB_DISABLE_XET
    hf_constants.HF_HUB_DISABLE_XET = True
    root = tmp_path_factory.mktemp("localhub")
    info = seed(root)
    server = LocalHub(root).start(port=0)
    server.seed_info = info
    yield server
    server.stop()
    hf_constants.HF_HUB_DISABLE_XET = old_xet


@pytest.fixture(scope="module")
def tokens(hub) -> dict[str, str]:
    return {u["name"]: u["token"] for u in hub.seed_info["users"]}


@pytest.fixture(scope="module")
def shas(hub) -> dict[str, str]:
    return {r["repo_id"]: r["commit"] for r in hub.seed_info["repos"]}


def api(hub, token) -> HfApi:
    return HfApi(endpoint=hub.url, token=token)


def new_repo_name() -> str:
    return f"loraflow-demo/contract-{uuid.uuid4().hex[:8]}"


def client_env(hub, tmp_path: Path, token: str) -> dict:
    env = dict(os.environ)
    env.update({
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p),
    })
    return env


def run_client(code: str, env: dict) -> dict:
    """Run `code` in a fresh interpreter; it must print one JSON object as its last stdout line."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- seeding


def test_seed_is_deterministic_and_idempotent(hub, tmp_path):
    again = seed(hub.root)
    assert again == hub.seed_info
    elsewhere = seed(tmp_path / "other-root")
    assert elsewhere == hub.seed_info  # same tokens and commit shas in any root
    cli = subprocess.run([sys.executable, "-m", "localhub", "seed", "--root", str(hub.root)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == hub.seed_info
    info = hub.seed_info
    assert {u["name"] for u in info["users"]} == {"demo", "reader", "owner"}
    for u in info["users"]:
        assert u["token"].startswith("hf_") and sum(c.isalnum() for c in u["token"][3:]) < 30
    repos = {r["repo_id"]: r for r in info["repos"]}
    assert repos[MODEL]["type"] == "model" and repos[MODEL]["gated"] is True
    assert repos[DATASET]["type"] == "dataset" and repos[DATASET]["gated"] is False


# --------------------------------------------------------------------------- identity and metadata


def test_whoami(hub, tokens):
    for name, token in tokens.items():
        me = api(hub, token).whoami()
        assert me["name"] == name
        assert me["auth"]["accessToken"]["role"] == ("read" if name == "reader" else "write")
    assert [o["name"] for o in api(hub, tokens["demo"]).whoami()["orgs"]] == ["loraflow-demo"]
    with pytest.raises(HfHubHTTPError) as exc:
        api(hub, "hf_not_a_real_token").whoami()
    assert exc.value.response.status_code == 401


def test_repo_info(hub, tokens, shas):
    anon = api(hub, False)
    model = anon.model_info(MODEL, files_metadata=True)
    assert model.sha == shas[MODEL] and len(model.sha) == 40 and int(model.sha, 16) >= 0
    assert model.gated == "manual" and model.private is False
    assert model.card_data.license == "apache-2.0" and model.pipeline_tag == "text-generation"
    siblings = {s.rfilename: s for s in model.siblings}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(siblings)
    st = siblings["model.safetensors"]
    assert st.lfs is not None and st.lfs.size == st.size and len(st.lfs.sha256) == 64
    assert siblings["config.json"].lfs is None and siblings["config.json"].size > 0

    ds = api(hub, tokens["reader"]).dataset_info(DATASET, revision=shas[DATASET])
    assert ds.sha == shas[DATASET] and ds.gated is False
    assert {"data/train.jsonl", "data/chat.jsonl", "README.md"} <= {s.rfilename for s in ds.siblings}

    with pytest.raises(RepositoryNotFoundError):
        anon.model_info("tinylabs/does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        anon.model_info(MODEL, revision="no-such-branch")


def test_auth_check_on_gated_model(hub, tokens):
    api(hub, tokens["demo"]).auth_check(MODEL)
    api(hub, tokens["owner"]).auth_check(MODEL)
    with pytest.raises(GatedRepoError) as exc:
        api(hub, tokens["reader"]).auth_check(MODEL)
    assert exc.value.response.status_code == 403
    assert f"{hub.url}/{MODEL} to request access" in exc.value.response.headers["X-Error-Message"]
    with pytest.raises(GatedRepoError) as exc:
        api(hub, False).auth_check(MODEL)
    assert exc.value.response.status_code == 401
    assert exc.value.response.headers["X-Error-Message"].startswith(f"Access to model {MODEL} is restricted")
    api(hub, False).auth_check(DATASET, repo_type="dataset")  # not gated


def test_gated_model_metadata_is_public_but_files_are_not(hub, tokens, tmp_path):
    anon = api(hub, False)
    paths = {f.path for f in anon.list_repo_tree(MODEL, recursive=True)}
    assert "model.safetensors" in paths
    assert [f.path for f in anon.get_paths_info(MODEL, ["config.json", "missing.txt"])] == ["config.json"]
    assert anon.list_repo_refs(MODEL).branches[0].name == "main"
    for token in (False, tokens["reader"]):
        with pytest.raises(GatedRepoError):
            hf_hub_download(MODEL, "config.json", endpoint=hub.url, token=token, cache_dir=tmp_path / "c")


# --------------------------------------------------------------------------- downloads


def test_snapshot_download_pinned_and_verified(hub, tokens, shas, tmp_path):
    cache = tmp_path / "cache"
    path = snapshot_download(MODEL, revision=shas[MODEL], allow_patterns=["*.json", "*.safetensors"],
                             cache_dir=cache, endpoint=hub.url, token=tokens["demo"])
    got = {p.name for p in Path(path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= got
    assert "README.md" not in got
    assert Path(path).name == shas[MODEL]

    tree = {f.path: f for f in api(hub, tokens["demo"]).list_repo_tree(MODEL, revision=shas[MODEL], recursive=True)}
    st = (Path(path) / "model.safetensors").read_bytes()
    assert hashlib.sha256(st).hexdigest() == tree["model.safetensors"].lfs.sha256

    verify = getattr(HfApi, "verify_repo_checksums", None)
    if verify is not None:
        result = api(hub, tokens["demo"]).verify_repo_checksums(MODEL, revision=shas[MODEL], cache_dir=cache)
        assert result.mismatches == []
        assert result.checked_count == len(got)
        assert set(result.missing_paths) == {"README.md", ".gitattributes"}


def test_missing_file_revision_and_repo(hub, tokens, tmp_path):
    kw = dict(endpoint=hub.url, token=tokens["demo"], cache_dir=tmp_path / "c")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(DATASET, "no/such/file.txt", repo_type="dataset", **kw)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(DATASET, "README.md", repo_type="dataset", revision="nope", **kw)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tinylabs/nothing-here", "README.md", **kw)


def test_ranged_reads(hub, tokens, shas):
    fs = HfFileSystem(endpoint=hub.url, token=tokens["demo"])
    before = len(hub.requests())
    with fs.open(f"{MODEL}@{shas[MODEL]}/model.safetensors", "rb") as f:  # block-cached ranged reads
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8)
        header = json.loads(f.read(header_len))
    assert header["__metadata__"] == {"format": "pt"}
    assert "model.layers.1.mlp.down_proj.weight" in header
    meta = api(hub, tokens["demo"]).get_safetensors_metadata(MODEL, revision=shas[MODEL])
    assert len(meta.files_metadata["model.safetensors"].tensors) == 21
    ranged = [r for r in hub.requests()[before:] if r["status"] == 206]
    assert ranged and all("/resolve/" in r["path"] for r in ranged)

    # HfFileSystem listing of a dataset (what `datasets` reads Hub repos through).
    files = fs.ls(f"datasets/{DATASET}@{shas[DATASET]}/data", detail=False)
    assert sorted(files) == [f"datasets/{DATASET}@{shas[DATASET]}/data/chat.jsonl",
                             f"datasets/{DATASET}@{shas[DATASET]}/data/train.jsonl"]
    first = fs.read_text(f"datasets/{DATASET}@{shas[DATASET]}/data/train.jsonl").splitlines()[0]
    assert set(json.loads(first)) == {"instruction", "input", "output"}


def test_resolve_headers_and_ranges(hub, tokens, shas):
    """What the download code relies on, checked at the HTTP level (Range forms the client may send)."""
    url = f"{hub.url}/{MODEL}/resolve/{shas[MODEL]}/model.safetensors"
    auth = {"Authorization": f"Bearer {tokens['owner']}"}

    def fetch(method="GET", **headers):
        req = urllib.request.Request(url, method=method, headers={**auth, **headers})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    status, h, body = fetch("HEAD")
    size = int(h["X-Linked-Size"])
    assert status == 200 and body == b"" and int(h["Content-Length"]) == size
    assert h["X-Repo-Commit"] == shas[MODEL] and h["Accept-Ranges"] == "bytes"
    assert h["ETag"] == h["X-Linked-Etag"] and len(h["ETag"].strip('"')) == 64
    _, _, full = fetch()
    assert len(full) == size
    status, h, body = fetch(Range="bytes=100-")  # resume
    assert status == 206 and body == full[100:] and h["Content-Range"] == f"bytes 100-{size - 1}/{size}"
    status, h, body = fetch(Range="bytes=0-7")  # safetensors header length
    assert status == 206 and body == full[:8] and h["Content-Length"] == "8"
    status, h, body = fetch(Range="bytes=-4")
    assert status == 206 and body == full[-4:]
    status, h, _ = fetch(Range=f"bytes={size}-")
    assert status == 416 and h["Content-Range"] == f"bytes */{size}"

    status, h, _ = fetch("HEAD", Authorization=f"Bearer {tokens['reader']}")
    assert status == 403 and h["X-Error-Code"] == "GatedRepo"
    status, h, body = fetch(Authorization="Bearer hf_wrong")
    assert status == 401 and json.loads(body)["error"]
    readme = f"{hub.url}/datasets/{DATASET}/resolve/main/README.md"
    with urllib.request.urlopen(readme) as r:  # a regular (non-LFS) file: ETag is the git blob sha1
        content = r.read()
        assert r.headers["ETag"] == f'"{git_blob_sha1(content)}"' and "X-Linked-Etag" not in r.headers


def test_list_repos(hub, tokens):
    anon = api(hub, False)
    ids = [m.id for m in anon.list_models(author="tinylabs")]
    assert MODEL in ids and all(i.startswith("tinylabs/") for i in ids)
    assert {"tinylabs/tiny-bert", "tinylabs/tiny-t5"} <= set(ids)  # localhub/seed_models.py
    assert [d.id for d in anon.list_datasets(search="tiny-instruct")] == [DATASET]
    assert all(not m.private for m in anon.list_models())


# --------------------------------------------------------------------------- writes


def test_create_commit_refs_tags_and_history(hub, tokens, tmp_path):
    demo = api(hub, tokens["demo"])
    repo_id = new_repo_name()
    url = demo.create_repo(repo_id, private=True)
    assert url.repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as exc:
        demo.create_repo(repo_id)
    assert exc.value.response.status_code == 409
    assert demo.create_repo(repo_id, exist_ok=True).repo_id == repo_id

    big = os.urandom(1_500_000)
    before = len(hub.requests())
    info = demo.create_commit(repo_id, operations=[CommitOperationAdd("notes.txt", b"hello\n"),
                                                   CommitOperationAdd("weights/big.bin", big)],
                              commit_message="add two files", commit_description="one small, one LFS")
    sha = info.oid
    assert len(sha) == 40
    served = hub.requests()[before:]
    assert any(r["path"].endswith(".git/info/lfs/objects/batch") for r in served)
    assert any(r["method"] == "PUT" and "/lfs/objects/upload/" in r["path"] for r in served)

    files = {s.rfilename: s for s in demo.model_info(repo_id, files_metadata=True).siblings}
    assert files["weights/big.bin"].lfs.sha256 == hashlib.sha256(big).hexdigest()
    assert files["notes.txt"].lfs is None

    # private: invisible to others
    for token in (False, tokens["reader"], tokens["owner"]):
        with pytest.raises(RepositoryNotFoundError):
            api(hub, token).model_info(repo_id)

    refs = demo.list_repo_refs(repo_id)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", sha)]
    assert refs.converts == [] and refs.tags == []
    demo.create_tag(repo_id, tag="v1", tag_message="first")
    with pytest.raises(HfHubHTTPError) as exc:
        demo.create_tag(repo_id, tag="v1")
    assert exc.value.response.status_code == 409
    assert [(t.name, t.target_commit) for t in demo.list_repo_refs(repo_id).tags] == [("v1", sha)]

    commits = demo.list_repo_commits(repo_id)
    assert [c.commit_id for c in commits][0] == sha
    assert [c.title for c in commits] == ["add two files", "initial commit"]
    assert commits[0].message == "one small, one LFS" and commits[0].authors == ["demo"]

    # resolve by tag, by sha, and by a branch whose name needs percent-encoding
    demo.create_branch(repo_id, branch="feature/x", revision="v1")
    for rev in ("v1", sha, "feature/x"):
        p = hf_hub_download(repo_id, "weights/big.bin", revision=rev, endpoint=hub.url, token=tokens["demo"],
                            cache_dir=tmp_path / "c")
        assert Path(p).read_bytes() == big
    demo.delete_branch(repo_id, branch="feature/x")
    demo.delete_tag(repo_id, tag="v1")
    assert demo.list_repo_refs(repo_id).tags == []


def test_stale_parent_commit_is_rejected(hub, tokens):
    demo = api(hub, tokens["demo"])
    repo_id = new_repo_name()
    demo.create_repo(repo_id)
    initial = demo.model_info(repo_id).sha
    head = demo.create_commit(repo_id, [CommitOperationAdd("a.txt", b"a")], commit_message="a",
                              parent_commit=initial).oid
    with pytest.raises(HfHubHTTPError) as exc:
        demo.create_commit(repo_id, [CommitOperationAdd("b.txt", b"b")], commit_message="b", parent_commit=initial)
    assert exc.value.response.status_code == 412
    assert demo.model_info(repo_id).sha == head
    assert len(demo.list_repo_commits(repo_id)) == 2


def test_permissions(hub, tokens):
    reader = api(hub, tokens["reader"])
    with pytest.raises(HfHubHTTPError) as exc:
        reader.create_repo("reader/mine")
    assert exc.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as exc:
        reader.create_commit(DATASET, [CommitOperationAdd("x.txt", b"x")], commit_message="x", repo_type="dataset")
    assert exc.value.response.status_code == 403
    demo = api(hub, tokens["demo"])
    with pytest.raises(HfHubHTTPError) as exc:  # a write token, but not a tinylabs member
        demo.create_repo("tinylabs/not-yours")
    assert exc.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as exc:
        demo.auth_check(DATASET, repo_type="dataset", write=True)
    assert exc.value.response.status_code == 403
    api(hub, tokens["owner"]).auth_check(DATASET, repo_type="dataset", write=True)


def test_unchanged_upload_makes_no_commit(hub, tokens):
    demo = api(hub, tokens["demo"])
    repo_id = new_repo_name()
    demo.create_repo(repo_id)
    big = os.urandom(1_200_000)

    def ops():
        return [CommitOperationAdd("config.json", b'{"a": 1}\n'), CommitOperationAdd("adapter.safetensors", big)]

    first = demo.create_commit(repo_id, ops(), commit_message="upload").oid
    again = demo.create_commit(repo_id, ops(), commit_message="upload again").oid
    assert again == first
    assert len(demo.list_repo_commits(repo_id)) == 2
    assert demo.upload_file(path_or_fileobj=b'{"a": 1}\n', path_in_repo="config.json", repo_id=repo_id).oid == first


def test_fault_injection_on_commit(hub, tokens):
    demo = api(hub, tokens["demo"])
    repo_id = new_repo_name()
    demo.create_repo(repo_id)
    head = demo.model_info(repo_id).sha
    # Through the admin HTTP endpoint, as an out-of-process test would do it.
    req = urllib.request.Request(
        f"{hub.url}/_localhub/faults", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"method": "POST", "path_regex": f"^/api/models/{repo_id}/commit/", "status": 500,
                         "times": 1}).encode())
    with urllib.request.urlopen(req) as r:
        assert r.status == 200
    with pytest.raises(HfHubHTTPError) as exc:
        demo.create_commit(repo_id, [CommitOperationAdd("a.txt", b"a")], commit_message="a")
    assert exc.value.response.status_code == 500
    assert exc.value.response.headers["X-Error-Message"] == "injected fault"
    assert demo.model_info(repo_id).sha == head  # nothing committed
    sha = demo.create_commit(repo_id, [CommitOperationAdd("a.txt", b"a")], commit_message="a").oid
    assert sha != head and demo.model_info(repo_id).sha == sha

    hub.inject_fault(r"/commit/", status=503, times=5, method="POST")
    req = urllib.request.Request(f"{hub.url}/_localhub/faults", method="DELETE")
    with urllib.request.urlopen(req) as r:
        assert json.loads(r.read()) == {"faults": []}
    demo.create_commit(repo_id, [CommitOperationAdd("b.txt", b"b")], commit_message="b")


def test_settings_card_and_delete(hub, tokens):
    demo = api(hub, tokens["demo"])
    repo_id = new_repo_name()
    demo.create_repo(repo_id, private=True)
    with pytest.raises(ValueError):  # validate-yaml rejects it before anything is uploaded
        demo.create_commit(repo_id, [CommitOperationAdd("README.md", b"---\nlicense: [unclosed\n---\n")],
                           commit_message="bad card")
    demo.create_commit(repo_id, [CommitOperationAdd("README.md", b"---\nlicense: mit\ntags: [lora]\n---\n# hi\n")],
                       commit_message="card")
    demo.update_repo_settings(repo_id, private=False)
    info = api(hub, tokens["reader"]).model_info(repo_id)
    assert info.private is False and info.card_data.license == "mit" and "lora" in info.tags
    demo.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        demo.model_info(repo_id)


def test_request_log(hub, tokens):
    text = (Path(hub.root) / "requests.log").read_text()
    for token in tokens.values():
        assert token not in text
    reqs = hub.requests()
    assert len(reqs) == len(text.splitlines())
    assert {"method", "path", "status", "user"} == set(reqs[-1])
    assert any(r["user"] == "demo" for r in reqs) and any(r["user"] == "-" for r in reqs)


# --------------------------------------------------------------------------- other clients (subprocesses)


def test_datasets_load_dataset(hub, tokens, shas, tmp_path):
    out = run_client(f"""
        import json
        from datasets import load_dataset
        from huggingface_hub import hf_hub_download
        ds = load_dataset("{DATASET}", revision="{shas[DATASET]}")
        path = hf_hub_download("{DATASET}", "data/chat.jsonl", repo_type="dataset", revision="{shas[DATASET]}")
        chat = load_dataset("json", data_files=path, split="train")
        import huggingface_hub
        print(json.dumps({{"hub": huggingface_hub.__version__, "splits": list(ds), "rows": ds["train"].num_rows,
                          "columns": ds["train"].column_names, "chat_rows": chat.num_rows,
                          "chat_first": chat[0]["messages"]}}))
    """, client_env(hub, tmp_path, tokens["reader"]))
    assert out["hub"] == huggingface_hub.__version__  # the subprocess runs the same client
    assert out["splits"] == ["train"]
    assert out["rows"] == 256
    assert sorted(out["columns"]) == ["input", "instruction", "output"]
    assert out["chat_rows"] == 256 and [m["role"] for m in out["chat_first"]] == ["user", "assistant"]


def test_transformers_from_pretrained(hub, tokens, shas, tmp_path):
    out = run_client(f"""
        import io, json, logging, os, warnings
        warnings.simplefilter("always")
        log = io.StringIO()
        logging.getLogger("transformers").addHandler(logging.StreamHandler(log))
        with warnings.catch_warnings(record=True) as caught:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            token = os.environ["HF_TOKEN"]
            model = AutoModelForCausalLM.from_pretrained("{MODEL}", revision="{shas[MODEL]}", token=token)
            tok = AutoTokenizer.from_pretrained("{MODEL}", revision="{shas[MODEL]}", token=token)
        text = tok.apply_chat_template([{{"role": "user", "content": "Repeat the word twice.\\napple"}}],
                                       tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        print(json.dumps({{"cls": type(model).__name__, "params": model.num_parameters(), "vocab": len(tok),
                          "text": text, "tokens": tok.convert_ids_to_tokens(ids),
                          "warnings": [str(w.message) for w in caught] + log.getvalue().splitlines()}}))
    """, client_env(hub, tmp_path, tokens["demo"]))
    problems = [w for w in out["warnings"] if any(k in w.lower() for k in ("missing", "unexpected", "initializ"))]
    assert problems == []
    assert out["cls"] == "LlamaForCausalLM" and out["vocab"] == 512
    assert out["text"].startswith("<s><|user|>") and out["text"].endswith("<|assistant|>\n")
    assert "<unk>" not in out["tokens"] and out["tokens"][-1] == "<|assistant|>"


# --------------------------------------------------------------------------- seeded adapter


def test_seeded_adapter_repo_pins_the_seeded_base(hub, tokens, shas, tmp_path):
    from localhub.seed_adapters import ADAPTER_REPO

    repo = {r["repo_id"]: r for r in hub.seed_info["repos"]}[ADAPTER_REPO]
    assert repo["type"] == "model" and repo["gated"] is False and repo["private"] is False
    info = api(hub, tokens["reader"]).model_info(ADAPTER_REPO, files_metadata=True)
    assert info.sha == shas[ADAPTER_REPO]
    files = {s.rfilename: s for s in info.siblings}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert "config.json" not in files and files["adapter_model.safetensors"].lfs is not None
    assert info.card_data.base_model == MODEL and info.card_data.library_name == "peft"
    config = json.loads(Path(hf_hub_download(ADAPTER_REPO, "adapter_config.json", revision=info.sha,
                                             cache_dir=tmp_path, endpoint=hub.url,
                                             token=tokens["reader"])).read_text())
    assert (config["peft_type"], config["base_model_name_or_path"], config["revision"]) == (
        "LORA", MODEL, shas[MODEL])
    header = api(hub, tokens["reader"]).parse_safetensors_file_metadata(
        ADAPTER_REPO, "adapter_model.safetensors", revision=info.sha)
    names = set(header.tensors)
    assert len(names) == 2 * 7 * 2 and all(".lora_A.weight" in n or ".lora_B.weight" in n for n in names)
