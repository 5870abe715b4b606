"""Naming a model by its Hugging Face repo id, `org/name[@revision]`: resolved through a Hugging Face cache
built in tmp_path (offline), through a stand-in for the Hub (the online code path, no network) and on the
command line; every failure one line."""

from __future__ import annotations

import fnmatch
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from _cases import document, raises_one_line
from _tiny_pipeline import byte_tokenizer
from parallelcomp_triton import ParallelComp
from parallelcomp_triton.loading import resolve_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(root: pathlib.Path, repo_id: str, files_from: pathlib.Path, commit: str = COMMIT,
                   refs=("main",)) -> pathlib.Path:
    """A Hugging Face cache holding `files_from` as repo `repo_id` at `commit`; returns the snapshot dir."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, model_dir, monkeypatch):
    """A cache with the tiny Llama as tiny-org/tiny-llama; huggingface_hub pointed at it, offline.
    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into constants at import: patch both."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = make_hub_cache(cache, "tiny-org/tiny-llama", model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, snapshot


def test_repo_id_resolves_to_the_cached_snapshot(hub_cache):
    cache, snapshot = hub_cache
    for name in ("tiny-org/tiny-llama", "tiny-org/tiny-llama@main", f"tiny-org/tiny-llama@{COMMIT}"):
        assert resolve_model_dir(name).resolve() == snapshot.resolve(), name
    pc = ParallelComp.from_pretrained("tiny-org/tiny-llama", dtype="float32")
    assert pathlib.Path(pc.source).resolve() == snapshot.resolve()


def test_missing_repo_offline_is_one_line(hub_cache):
    cache, _ = hub_cache
    raises_one_line(lambda: resolve_model_dir("tiny-org/absent"), "tiny-org/absent", "HF_HUB_OFFLINE=1",
                    "cache", str(cache))
    raises_one_line(lambda: resolve_model_dir("tiny-org/tiny-llama@v2"), "tiny-org/tiny-llama@v2",
                    "HF_HUB_OFFLINE=1")


def test_local_directory_wins_and_paths_keep_their_error(hub_cache, tmp_path, monkeypatch):
    cache, _ = hub_cache
    local = tmp_path / "tiny-org" / "tiny-llama"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("tiny-org/tiny-llama") == pathlib.Path("tiny-org/tiny-llama")
    for name in ("./nope/model", str(tmp_path / "nope"), "a/b/c", "org/", "~/nope/x", "org/na..me"):
        raises_one_line(lambda: resolve_model_dir(name), "model directory does not exist")
    raises_one_line(lambda: resolve_model_dir(tmp_path / "org" / "name"), "does not exist")  # a Path: never a repo


def test_huggingface_hub_imported_only_for_repo_ids(model_dir, tmp_path):
    code = ("import sys; from parallelcomp_triton.loading import resolve_model_dir as r\n"
            f"r({str(model_dir)!r})\n"
            "try:\n    r('missing/dir/x')\nexcept Exception:\n    pass\n"
            "print('huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, HF_HUB_CACHE=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


class FakeHub:
    """A stand-in for huggingface_hub.snapshot_download online: copies the files of `remote` that match
    allow_patterns into a cache snapshot, or raises `error`; records every call."""

    def __init__(self, remote: pathlib.Path, cache: pathlib.Path, error: Exception | None = None):
        self.remote, self.cache, self.error, self.calls = remote, cache, error, []

    def __call__(self, repo_id, *, revision=None, allow_patterns=None, local_files_only=False, **kw):
        self.calls.append(dict(repo_id=repo_id, revision=revision, allow_patterns=list(allow_patterns or []),
                               local_files_only=local_files_only, **kw))
        if self.error is not None:
            raise self.error
        snapshot = self.cache / "snapshots" / COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        for f in self.remote.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, snapshot / f.name)
        return str(snapshot)


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _http_error(cls, status: int):
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/o/n"))
    return cls(f"{status} Client Error", response=response)


def test_online_download_fetches_only_what_loading_reads(online, tmp_path, monkeypatch):
    """A sharded repo that also holds pickled weights, Mistral's consolidated.safetensors and a README:
    only config, tokenizer and the index's shards are fetched, and the snapshot loads."""
    import huggingface_hub

    from _tiny_models import save_tiny_llama

    remote = save_tiny_llama(tmp_path / "remote", max_shard_size="100KB", vocab_size=259)
    byte_tokenizer().save_pretrained(remote)
    shards = sorted(p.name for p in remote.glob("model-*.safetensors"))
    assert len(shards) > 1
    shutil.copy(remote / shards[0], remote / "consolidated.safetensors")
    torch.save({"x": torch.zeros(1)}, remote / "pytorch_model.bin")
    (remote / "README.md").write_text("# model card")
    fake = FakeHub(remote, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)

    path = resolve_model_dir("org/sharded@v1")
    fetched = sorted(p.name for p in path.iterdir())
    assert "pytorch_model.bin" not in fetched and "consolidated.safetensors" not in fetched
    assert "README.md" not in fetched
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", *shards} <= set(fetched)
    assert [c["revision"] for c in fake.calls] == ["v1", COMMIT]  # the shards at the commit just resolved
    assert not any(c["local_files_only"] for c in fake.calls)
    assert not any(fnmatch.fnmatch("pytorch_model.bin", p) for c in fake.calls for p in c["allow_patterns"])
    ParallelComp.from_pretrained("org/sharded@v1", dtype="float32")


def test_offline_passes_local_files_only(tmp_path, monkeypatch, model_dir):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake = FakeHub(model_dir, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolve_model_dir("org/name")
    assert fake.calls and all(c["local_files_only"] for c in fake.calls)


def test_repo_without_safetensors_is_one_line(online, tmp_path, monkeypatch, model_dir):
    import huggingface_hub

    remote = pathlib.Path(shutil.copytree(model_dir, tmp_path / "remote"))
    (remote / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, remote / "pytorch_model.bin")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(remote, tmp_path / "cache"))
    raises_one_line(lambda: resolve_model_dir("org/old-format"), "org/old-format", "no safetensors weights",
                    "pickled weights (pytorch_model.bin)")


def _hub_error(name: str, *args):
    """An error of huggingface_hub.utils (made when the test runs: the module is imported only for repo ids)."""
    def make():
        from huggingface_hub import utils as hub_errors

        cls = getattr(hub_errors, name)
        return _http_error(cls, *args) if args else cls("Cannot find ... \n connection")
    return make


# id, what snapshot_download raises, the model named, words of the one-line message
HUB_ERRORS = [
    ("no_such_repo", _hub_error("RepositoryNotFoundError", 401), "org/name",
     ["no such Hugging Face repo", "hf auth login", "HF_TOKEN"]),
    ("gated", _hub_error("GatedRepoError", 403), "org/name", ["gated", "hf auth login", "HF_TOKEN"]),
    ("no_such_revision", _hub_error("RevisionNotFoundError", 404), "org/name@nope", ["revision 'nope' not found"]),
    ("forbidden", _hub_error("HfHubHTTPError", 403), "org/name", ["HTTP 403", "HF_TOKEN"]),
    ("server_error", _hub_error("HfHubHTTPError", 500), "org/name", ["download", "500"]),
    ("unreachable", _hub_error("LocalEntryNotFoundError"), "org/name", ["cannot be reached"]),
    ("disk_full", lambda: OSError(28, "No space left on device"), "org/name", ["No space left"]),
]


@pytest.mark.parametrize("error,name,words", [pytest.param(*row, id=i) for i, *row in HUB_ERRORS])
def test_hub_errors_are_one_line(online, tmp_path, monkeypatch, error, name, words):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tmp_path, tmp_path / "c", error()))
    raises_one_line(lambda: resolve_model_dir(name), name, *words)


def run_cli(*args, env_extra):
    env = dict(os.environ, TRITON_INTERPRET="0", **env_extra)
    return subprocess.run([sys.executable, "-m", "parallelcomp_triton.run", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_repo_id_answers_as_the_directory(model_dir, tmp_path):
    cache = tmp_path / "hub"
    make_hub_cache(cache, "tiny-org/tiny-llama", model_dir)
    doc = tmp_path / "doc.txt"
    doc.write_text(document(150, seed=6))
    common = ["--input", str(doc), "--question", "Which word comes first?", "--max-new-tokens", "6",
              "--dtype", "float32", "--chunk-tokens", "60", "--keep-chunks", "2", "--kv-budget", "20", "--json",
              "--no-progress", "--ignore-eos"]
    env = dict(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    by_dir = run_cli("--model", str(model_dir), *common, env_extra=env)
    by_id = run_cli("--model", "tiny-org/tiny-llama@main", *common, env_extra=env)
    assert by_dir.returncode == 0, by_dir.stderr
    assert by_id.returncode == 0, by_id.stderr
    a, b = json.loads(by_dir.stdout), json.loads(by_id.stdout)
    assert len(a["token_ids"]) == 6 and a["stats"]["kept_chunks"]
    assert (b["answer"], b["token_ids"], b["stats"]["kept_chunks"]) == (a["answer"], a["token_ids"],
                                                                        a["stats"]["kept_chunks"])

    missing = run_cli("--model", "tiny-org/absent", *common, env_extra=env)
    assert missing.returncode == 2
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: tiny-org/absent") and "HF_HUB_OFFLINE" in lines[0]


@pytest.mark.slow
def test_cli_bundled_model_by_repo_id_answers_as_by_directory(bundled_model_dir, tmp_path):
    """The bundled model copied into a Hugging Face cache under a made-up id, offline: `--model org/name`
    gives exactly the answer `--model DIR` gives."""
    cache = tmp_path / "hub"
    make_hub_cache(cache, "made-up-org/smollm2-135m", bundled_model_dir)
    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 52114. " + "The grass is green. " * 40)
    common = ["--input", str(doc), "--question", "What is the pass key? The pass key is", "--max-new-tokens", "6",
              "--json", "--no-progress"]
    env = dict(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    by_dir = run_cli("--model", str(bundled_model_dir), *common, env_extra=env)
    by_id = run_cli("--model", "made-up-org/smollm2-135m", *common, env_extra=env)
    assert by_dir.returncode == 0 and by_id.returncode == 0, by_dir.stderr + by_id.stderr
    a, b = json.loads(by_dir.stdout), json.loads(by_id.stdout)
    assert "52114" in a["answer"]
    assert (b["answer"], b["token_ids"], b["stats"]["kept_chunks"]) == (a["answer"], a["token_ids"],
                                                                        a["stats"]["kept_chunks"])
