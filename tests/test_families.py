"""The model families people have (Mistral, Qwen2, Qwen3 besides Llama) and naming them by Hub repo id.

Tiny random checkpoints saved by transformers' own classes: our logits within 1e-4 of transformers'
(eager, fp32) and identical greedy tokens, one ParallelComp run per family against transformers' greedy
decoding, the refusals (a sliding window that would mask, other model types), EOS ids from
generation_config.json, and `org/name[@revision]` resolved through a Hugging Face cache built in tmp_path
(offline), through a stand-in for the Hub (the online code path, no network) and on the command line."""

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

from _tiny_models import save_tiny_family, tiny_family_config
from _tiny_pipeline import byte_tokenizer
from parallelcomp_triton import ParallelComp, ParallelCompConfig
from parallelcomp_triton.errors import ParallelCompError
from parallelcomp_triton.loading import load_transformer, resolve_model_dir
from parallelcomp_triton.model import ModelArgs
from test_loading import raises_one_line
from test_model_vs_hf import assert_logits_close, greedy_hf, greedy_ours_teacher_forced

N_TOKENS = 128
N_NEW = 32
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()

# name -> (family, save_tiny_family overrides)
VARIANTS = {
    "qwen2": ("qwen2", {}),
    "qwen2_tied_mha": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "qwen3": ("qwen3", {}),  # head_dim 32 != 64 / 4
    "qwen3_gqa4_attention_bias": ("qwen3", dict(num_key_value_heads=1, attention_bias=True)),
    "mistral": ("mistral", {}),  # sliding_window null, as Mistral v0.2+ / Nemo
    "mistral_window_covers_all": ("mistral", dict(sliding_window=4096, head_dim=32)),
    "llama_attention_bias": ("llama", dict(attention_bias=True)),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("families")
    return {name: save_tiny_family(root / name, family, seed=i, tokenizer=tokenizer, vocab_size=len(tokenizer), **kw)
            for i, (name, (family, kw)) in enumerate(VARIANTS.items())}


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                attn_implementation="eager").eval()




def document(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()) + "."


# ------------------------------------------------------------------------------- model vs transformers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_family_logits_and_greedy_match_transformers(family_dirs, variant):
    model_dir = family_dirs[variant]
    family, _ = VARIANTS[variant]
    ours = load_transformer(model_dir)
    ref = hf_model(model_dir)
    assert ours.args.model_type == family and type(ref).__name__.lower().startswith(family)
    assert ours.args.head_dim == ref.model.layers[0].self_attn.head_dim
    if ref.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight

    ids = torch.randint(0, ours.args.vocab_size, (N_TOKENS,), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref_logits = ref(ids[None]).logits[0]
    assert ref_logits.abs().max() > 1.0
    assert_logits_close(ours.logits(ids[None])[0], ref_logits)

    prompt = ids[:32]
    expected = greedy_hf(ref, prompt, N_NEW)
    assert greedy_ours_teacher_forced(ours, prompt, expected) == expected


def test_family_fields_and_checkpoint_keys(family_dirs):
    """The family switches are the few ModelArgs fields; parameter names are the checkpoint's keys."""
    from parallelcomp_triton.loading import read_safetensors

    expect = {"qwen2": (True, False, False), "qwen3": (False, False, True), "mistral": (False, False, False),
              "qwen3_gqa4_attention_bias": (True, True, True), "llama_attention_bias": (True, True, False)}
    for name, (qkv_bias, o_bias, qk_norm) in expect.items():
        model = load_transformer(family_dirs[name])
        a = model.args
        assert (a.qkv_bias, a.o_bias, a.qk_norm) == (qkv_bias, o_bias, qk_norm), name
        saved = {k.removeprefix("model.") for k in read_safetensors(family_dirs[name])}
        assert set(model.state_dict()) - {"lm_head.weight"} <= saved | {"lm_head.weight"}
        assert ("layers.1.self_attn.q_proj.bias" in saved) == qkv_bias
        assert ("layers.1.self_attn.k_norm.weight" in saved) == qk_norm
    assert load_transformer(family_dirs["qwen3"]).args.head_dim == 32


@pytest.mark.parametrize("variant", ["qwen2", "qwen3", "mistral"])
def test_parallelcomp_run_equals_transformers_greedy(family_dirs, variant):
    """One chunk, K = 1, every KV kept: the answer is greedy decoding of the whole prompt, here checked
    against transformers' own cached decoding. Then a run with several chunks, eviction and a KV budget."""
    pc = ParallelComp.from_pretrained(family_dirs[variant], dtype="float32")
    doc, question = document(40, seed=1), "Which word comes first?"
    cfg = ParallelCompConfig(keep_chunks=1, kv_budget=None, max_new_tokens=8, ignore_eos=True, template="chat")
    res = pc.generate(doc, question, config=cfg)
    assert len(res.stats["chunk_spans"]) == 1
    toks = pc.prepare(cfg, doc, question).toks
    full = torch.tensor(toks.prefix + toks.document + toks.suffix)
    assert res.token_ids == greedy_hf(hf_model(family_dirs[variant]), full, 8)

    cfg = ParallelCompConfig(chunk_tokens=40, keep_chunks=2, kv_budget=16, max_new_tokens=4, ignore_eos=True)
    res = pc.generate(document(120, seed=2), question, config=cfg)
    assert len(res.stats["chunk_spans"]) >= 3 and len(res.stats["kept_chunks"]) == 2
    assert len(res.token_ids) == 4


# ------------------------------------------------------------------------------- refusals


_DROP = object()  # an edit that removes the field


def _cfg(family, **edits) -> dict:
    """A config.json dict of the tiny `family` model with `edits` applied."""
    cfg = tiny_family_config(family).to_dict()
    cfg.update(edits)
    return {k: v for k, v in cfg.items() if v is not _DROP}


@pytest.mark.parametrize("family,edits,refused", [
    # Mistral: the window applies to every layer; at least max_position_embeddings it masks nothing.
    ("mistral", dict(sliding_window=32), "sliding_window=32"),
    ("mistral", dict(sliding_window=4095), "sliding_window=4095"),
    # Absent: MistralConfig's 4096 (Mistral 7B v0.1: 4096 of 32768).
    ("mistral", dict(sliding_window=_DROP, max_position_embeddings=32768), "sliding_window=4096"),
    ("mistral", dict(sliding_window=None), None),
    ("mistral", dict(sliding_window=4096), None),
    ("mistral", dict(sliding_window=131072), None),
    # Qwen: a sliding_window value counts only with use_sliding_window, for layers >= max_window_layers.
    ("qwen2", dict(use_sliding_window=False, sliding_window=32, layer_types=None), None),
    ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=0, layer_types=None),
     "sliding_window=32"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=1, layer_types=None),
     "sliding_window=32"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=2, layer_types=None), None),
    ("qwen3", dict(use_sliding_window=True, sliding_window=32, layer_types=["full_attention", "sliding_attention"]),
     "sliding_window=32"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=32, layer_types=["full_attention"] * 2), None),
    ("qwen3", dict(use_sliding_window=False, sliding_window=32, layer_types=["sliding_attention"] * 2), None),
])
def test_sliding_window_refused_only_where_it_would_mask(family, edits, refused):
    cfg = _cfg(family, **edits)
    if refused is None:
        assert ModelArgs.from_hf_config(cfg).model_type == family
    else:
        raises_one_line(lambda: ModelArgs.from_hf_config(cfg), refused,
                        f"max_position_embeddings={cfg['max_position_embeddings']}", "not supported")


def test_small_sliding_window_checkpoint_is_refused(tmp_path):
    model_dir = save_tiny_family(tmp_path / "mistral_v01", "mistral", sliding_window=64)
    raises_one_line(lambda: load_transformer(model_dir), model_dir / "config.json", "sliding_window=64")


def test_transformers4_qwen2_config_with_unused_window_loads(family_dirs, tmp_path):
    """Qwen2/2.5 config.json written by transformers 4 keeps e.g. sliding_window 131072 or 32768 with
    use_sliding_window false: ignored by transformers, so here too (and the logits still match)."""
    model_dir = pathlib.Path(shutil.copytree(family_dirs["qwen2"], tmp_path / "qwen2_t4"))
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(use_sliding_window=False, sliding_window=16, max_window_layers=0)
    cfg.pop("layer_types")
    (model_dir / "config.json").write_text(json.dumps(cfg))
    ours, ref = load_transformer(model_dir), hf_model(model_dir)
    ids = torch.randint(0, ours.args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_logits_close(ours.logits(ids)[0], ref(ids).logits[0])


@pytest.mark.parametrize("model_type", ["gemma", "qwen2_moe", "mixtral", None])
def test_unsupported_model_type_is_one_line(model_type):
    cfg = _cfg("llama", model_type=model_type, architectures=["SomethingForCausalLM"])
    raises_one_line(lambda: ModelArgs.from_hf_config(cfg, source="x/config.json"), "x/config.json",
                    repr(model_type), "llama, mistral, qwen2, qwen3")


def test_defaults_of_fields_config_json_leaves_out():
    """What transformers' config classes assume for a missing field (Qwen3Config: head_dim 128)."""
    assert ModelArgs.from_hf_config(_cfg("qwen3", head_dim=_DROP)).head_dim == 128
    assert ModelArgs.from_hf_config(_cfg("qwen2", head_dim=_DROP)).head_dim == 16
    args = ModelArgs.from_hf_config(_cfg("mistral", max_position_embeddings=_DROP, sliding_window=None))
    assert args.max_position_embeddings == 131072


def test_architecture_must_match_the_model_type():
    cfg = _cfg("qwen2", architectures=["Qwen2ForSequenceClassification"])
    raises_one_line(lambda: ModelArgs.from_hf_config(cfg), "Qwen2ForSequenceClassification", "Qwen2ForCausalLM")
    raises_one_line(lambda: ModelArgs.from_hf_config(_cfg("llama", mlp_bias=True)), "mlp_bias")


# ------------------------------------------------------------------------------- EOS ids


def test_eos_ids_from_generation_config(family_dirs, tmp_path):
    """transformers stops on generation_config.json's eos_token_id; Qwen lists two there and one in
    config.json. Both files count: decoding stops at a token only generation_config.json names."""
    model_dir = pathlib.Path(shutil.copytree(family_dirs["qwen3"], tmp_path / "qwen3"))
    gen_path = model_dir / "generation_config.json"
    doc, question = document(30, seed=4), "Which word comes first?"
    cfg = ParallelCompConfig(keep_chunks=1, kv_budget=None, max_new_tokens=6)

    gen_path.unlink()
    pc = ParallelComp.from_pretrained(model_dir, dtype="float32")
    assert pc.args.eos_token_ids == (2,)  # config.json's
    first = pc.generate(doc, question, config=cfg).token_ids
    assert len(first) == 6 and first[0] not in (2, 5)

    gen_path.write_text(json.dumps({"eos_token_id": [first[0], 5, 2], "bos_token_id": 1}))
    pc = ParallelComp.from_pretrained(model_dir, dtype="float32")
    assert pc.args.eos_token_ids == (2, first[0], 5)
    assert pc.generate(doc, question, config=cfg).token_ids == []  # stopped at once (EOS is stripped)

    gen_path.write_text(json.dumps({"eos_token_id": first[0]}))
    assert load_transformer(model_dir).args.eos_token_ids == (2, first[0])
    gen_path.write_text('{"eos_token_id": [1,')
    raises_one_line(lambda: load_transformer(model_dir), gen_path, "invalid JSON")
    gen_path.write_text(json.dumps({"eos_token_id": "</s>"}))
    raises_one_line(lambda: load_transformer(model_dir), gen_path, "eos_token_id")


# ------------------------------------------------------------------------------- Hub repo ids


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


def test_hub_errors_are_one_line(online, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import utils as hub_errors

    cases = [
        (_http_error(hub_errors.RepositoryNotFoundError, 401), "org/name", ["no such Hugging Face repo",
                                                                             "hf auth login", "HF_TOKEN"]),
        (_http_error(hub_errors.GatedRepoError, 403), "org/name", ["gated", "hf auth login", "HF_TOKEN"]),
        (_http_error(hub_errors.RevisionNotFoundError, 404), "org/name@nope", ["revision 'nope' not found"]),
        (_http_error(hub_errors.HfHubHTTPError, 403), "org/name", ["HTTP 403", "HF_TOKEN"]),
        (_http_error(hub_errors.HfHubHTTPError, 500), "org/name", ["download", "500"]),
        (hub_errors.LocalEntryNotFoundError("Cannot find ... \n connection"), "org/name", ["cannot be reached"]),
        (OSError(28, "No space left on device"), "org/name", ["No space left"]),
    ]
    for error, name, words in cases:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tmp_path, tmp_path / "c", error))
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
    common = ["--input", str(doc), "--question", "Which word comes first?", "--max-new-tokens", "6", "--dtype", "float32",
              "--chunk-tokens", "60", "--keep-chunks", "2", "--kv-budget", "20", "--json", "--no-progress",
              "--ignore-eos"]
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


@pytest.fixture(scope="module")
def bundled_tokenizer(bundled_model_dir):
    from parallelcomp_triton.loading import load_tokenizer

    return load_tokenizer(bundled_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_family_with_the_bundled_tokenizer_matches_transformers(family, bundled_tokenizer, essays_dir, tmp_path):
    """A random checkpoint of each family made by transformers with the bundled tokenizer (its full 49,152-token
    vocabulary) beside it: loaded through ParallelComp, logits on real text within 1e-4 of transformers'."""
    path = save_tiny_family(tmp_path / family, family, tokenizer=bundled_tokenizer,
                            vocab_size=len(bundled_tokenizer))
    pc = ParallelComp.from_pretrained(path, dtype="float32")
    text = pathlib.Path(essays_dir, "addiction.txt").read_text()[:2000]
    ids = torch.tensor(pc.tokenizer(text)["input_ids"][:N_TOKENS])
    assert len(ids) == N_TOKENS and pc.args.vocab_size == len(bundled_tokenizer)
    with torch.no_grad():
        ref = hf_model(path)(ids[None]).logits[0]
    assert_logits_close(pc.model.logits(ids[None])[0], ref)
