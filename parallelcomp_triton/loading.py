"""Load a Hugging Face Llama checkpoint directory into the project's ``Transformer``.

Reads ``config.json``, ``model.safetensors`` (or a sharded ``model.safetensors.index.json``) and the
tokenizer, all offline. Weights are memory-mapped and converted one tensor at a time, and the model
is built on the meta device, so peak memory is one copy of the weights in the requested dtype.

Pickled weights (``pytorch_model.bin``, ``*.pt``, ``*.pth``) are refused: unpickling runs arbitrary
code. Every bad input raises ``ParallelCompError`` with a one-line message naming the file.

Checkpoint tensors must match the model exactly: a missing tensor, a wrong shape or an unknown extra
tensor is an error (an extra tensor usually means another architecture, e.g. attention biases).
Only rotary ``inv_freq`` buffers, which old checkpoints saved and the model recomputes, are skipped.
With ``tie_word_embeddings`` the output projection is the embedding matrix, as in transformers, and
a saved ``lm_head.weight`` is ignored.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterator

import torch

from parallelcomp_triton.bundled import bundled_model_dir, one_line_error
from parallelcomp_triton.errors import ParallelCompError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"float32" / "bfloat16" / "float16" (or fp32 / bf16 / fp16, or a torch floating dtype)."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ParallelCompError(f"dtype {dtype!r}: expected one of float32, bfloat16, float16")


def resolve_model_dir(model_dir: str | os.PathLike | None) -> pathlib.Path:
    """The checkpoint directory to load: ``None`` means the bundled SmolLM2-135M-Instruct."""
    if model_dir is None:
        return bundled_model_dir()
    path = pathlib.Path(model_dir).expanduser()
    if not path.exists():
        raise ParallelCompError(f"{path}: model directory does not exist")
    if not path.is_dir():
        raise ParallelCompError(f"{path}: not a directory (expected a Hugging Face model directory)")
    return path


def read_config(model_dir: pathlib.Path) -> dict:
    path = pathlib.Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ParallelCompError(f"{path}: missing (not a Hugging Face model directory)")
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ParallelCompError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def weight_files(model_dir: pathlib.Path) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """(file to name in errors about the whole checkpoint, safetensors files to read)."""
    model_dir = pathlib.Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX_FILE
    if index.is_file():
        index_json = _read_json(index)
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ParallelCompError(f"{index}: no \"weight_map\" object")
        shards = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if not shard.is_file():
                raise ParallelCompError(f"{shard}: shard listed in {index.name} is missing")
        return index, shards
    single = model_dir / SAFETENSORS_FILE
    if single.is_file():
        return single, [single]
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ParallelCompError(
            f"{model_dir / pickles[0]}: pickled weights ({pickles[0]}) are refused; convert to safetensors"
        )
    raise ParallelCompError(f"{single}: missing (no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE} in {model_dir})")


def iter_safetensors(model_dir: pathlib.Path) -> Iterator[tuple[str, torch.Tensor, pathlib.Path]]:
    """(HF key, tensor, file) for every tensor of the checkpoint, read lazily from memory-mapped files."""
    from safetensors import safe_open

    _, files = weight_files(model_dir)
    seen: dict[str, pathlib.Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key in seen:
                        raise ParallelCompError(f"{path}: tensor {key} is also in {seen[key].name}")
                    seen[key] = path
                    yield key, f.get_tensor(key), path
        except ParallelCompError:
            raise
        except Exception as e:  # SafetensorError, OSError, ...: a truncated or corrupt file
            raise ParallelCompError(f"{path}: corrupt or truncated safetensors file ({one_line_error(e)})") from None


def read_safetensors(model_dir: pathlib.Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint by HF key (``model.layers.0...``, ``lm_head.weight``)."""
    return {key: tensor for key, tensor, _ in iter_safetensors(model_dir)}


def load_transformer(model_dir: str | os.PathLike | None = None, dtype: str | torch.dtype = "float32",
                     device: str | torch.device = "cpu"):
    """The checkpoint's weights in the project's ``Transformer`` (eval mode, no grads)."""
    from parallelcomp_triton.model import ModelArgs, Transformer

    model_dir = resolve_model_dir(model_dir)
    dtype, device = parse_dtype(dtype), torch.device(device)
    cfg = read_config(model_dir)
    args = ModelArgs.from_hf_config(cfg, source=str(model_dir / CONFIG_FILE))
    with torch.device("meta"):  # no memory for the random init that the checkpoint overwrites
        model = Transformer(args)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")

    state: dict[str, torch.Tensor] = {}
    for key, tensor, path in iter_safetensors(model_dir):
        name = key[len("model."):] if key.startswith("model.") else key
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and args.tie_word_embeddings):
            continue
        if name not in expected:
            raise ParallelCompError(f"{path}: unexpected tensor {key} (not part of a {args.num_layers}-layer Llama)")
        if tuple(tensor.shape) != expected[name]:
            raise ParallelCompError(f"{path}: tensor {key} has shape {list(tensor.shape)}, "
                                    f"expected {list(expected[name])} from {CONFIG_FILE}")
        if not tensor.is_floating_point():
            raise ParallelCompError(f"{path}: tensor {key} has dtype {tensor.dtype}, expected floating point")
        state[name] = tensor.to(device=device, dtype=dtype)
    missing = [name for name in expected if name not in state]
    if missing:
        source, _ = weight_files(model_dir)
        key = missing[0] if missing[0] == "lm_head.weight" else f"model.{missing[0]}"
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ParallelCompError(f"{source}: missing tensor {key}{more}")

    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # one Parameter, as transformers ties them
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:  # a parameter or buffer the checkpoint does not provide: a loader/model mismatch, not bad input
        raise RuntimeError(f"load_transformer: {on_meta[0]} was never loaded (still on the meta device)")
    model.eval().requires_grad_(False)
    return model


def load_tokenizer(model_dir: str | os.PathLike | None = None):
    """``AutoTokenizer.from_pretrained`` on the local directory, never touching the network."""
    model_dir = resolve_model_dir(model_dir)
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ParallelCompError(f"{model_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise ParallelCompError(f"{model_dir}: cannot load the tokenizer ({one_line_error(e)})") from None


def load_model(model_dir: str | os.PathLike | None = None, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu"):
    """(``Transformer``, tokenizer) for an HF Llama directory; ``None`` loads the bundled SmolLM2-135M."""
    model_dir = resolve_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)  # cheap checks first: a bad tokenizer fails before the weights load
    return load_transformer(model_dir, dtype=dtype, device=device), tokenizer


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ParallelCompError(f"{path}: invalid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParallelCompError(f"{path}: unreadable ({one_line_error(e)})") from None
