"""Load a Hugging Face Llama, Mistral, Qwen2 or Qwen3 checkpoint into the project's ``Transformer``.

A model is named by a directory or a Hub repo id (``org/name``, ``org/name@revision``): an existing
directory wins; a repo id is resolved through the local Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``),
downloading only what loading needs (config, safetensors weights, tokenizer files) unless
``HF_HUB_OFFLINE=1``. Everything after that reads local files only.

Reads ``config.json`` (plus ``generation_config.json``'s EOS ids), ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) and the tokenizer. Weights are memory-mapped and converted one tensor
at a time, and the model is built on the meta device, so peak memory is one copy of the weights in the
requested dtype.

Pickled weights (``pytorch_model.bin``, ``*.pt``, ``*.pth``) are refused: unpickling runs arbitrary
code. Every bad input raises ``ParallelCompError`` with a one-line message naming the file.

Checkpoint tensors must match the model exactly: a missing tensor, a wrong shape or an unknown extra
tensor is an error (an extra tensor usually means another architecture, e.g. biases the config does not
announce).
Only rotary ``inv_freq`` buffers, which old checkpoints saved and the model recomputes, are skipped.
With ``tie_word_embeddings`` the output projection is the embedding matrix, as in transformers, and
a saved ``lm_head.weight`` is ignored.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Iterator

import torch

from parallelcomp_triton.bundled import bundled_model_dir, one_line_error
from parallelcomp_triton.errors import ParallelCompError

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
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


# A Hub repo id, optionally pinned: "org/name" or "org/name@revision" (branch, tag or commit).
_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>\S+))?")
# What loading reads from a Hub repo. Never pickled weights; the safetensors shards are fetched by the
# names the index lists (a repo may also hold e.g. Mistral's consolidated.safetensors, a second full copy).
HUB_FILES = [
    CONFIG_FILE, GENERATION_CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE,
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja",
]


def resolve_model_dir(model_dir: str | os.PathLike | None) -> pathlib.Path:
    """The checkpoint directory to load: ``None`` means the bundled SmolLM2-135M-Instruct; an existing
    directory is itself; otherwise ``org/name`` or ``org/name@revision`` is a Hugging Face Hub repo,
    resolved to its snapshot in the local Hugging Face cache (downloaded there first when online)."""
    if model_dir is None:
        return bundled_model_dir()
    path = pathlib.Path(model_dir).expanduser()
    if not path.exists():
        match = _REPO_ID.fullmatch(model_dir) if isinstance(model_dir, str) else None
        if match and ".." not in match["repo"]:
            return hub_snapshot_dir(match["repo"], match["revision"])
        raise ParallelCompError(f"{path}: model directory does not exist")
    if not path.is_dir():
        raise ParallelCompError(f"{path}: not a directory (expected a Hugging Face model directory)")
    return path


def hub_snapshot_dir(repo_id: str, revision: str | None = None) -> pathlib.Path:
    """The local snapshot of Hub repo `repo_id` at `revision` (default: main) with the files loading needs.

    huggingface_hub does the work and honours its environment: HF_HUB_CACHE / HF_HOME pick the cache,
    HF_TOKEN authenticates, HF_HUB_OFFLINE=1 reads the cache only. Online, it checks the revision on the
    Hub and downloads whatever the cache lacks (with its own progress bars); if the Hub cannot be reached it
    falls back to the cache. Every failure is one ParallelCompError line."""
    import huggingface_hub
    from huggingface_hub import constants

    label = f"{repo_id}@{revision}" if revision else repo_id
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        path = pathlib.Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=offline))
        index = path / SAFETENSORS_INDEX_FILE
        if index.is_file():  # a sharded checkpoint: the shards it lists, at the commit just resolved
            index_json = _read_json(index)
            weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
            if isinstance(weight_map, dict) and weight_map:
                shards = sorted({str(name) for name in weight_map.values()})
                huggingface_hub.snapshot_download(repo_id, revision=path.name, allow_patterns=shards,
                                                  local_files_only=offline)
    except ParallelCompError:
        raise
    except Exception as e:
        raise ParallelCompError(_hub_error(e, label, repo_id, revision, offline, constants.HF_HUB_CACHE)) from None
    if not (path / CONFIG_FILE).is_file():
        raise ParallelCompError(f"{label}: no {CONFIG_FILE} in the repository (not a transformers model) "
                                f"[snapshot {path}]")
    if not (path / SAFETENSORS_FILE).is_file() and not (path / SAFETENSORS_INDEX_FILE).is_file():
        partial = " or the cached copy is partial (HF_HUB_OFFLINE=1)" if offline else ""
        raise ParallelCompError(f"{label}: no safetensors weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE}): "
                                f"the repository has none{partial}; pickled weights (pytorch_model.bin) are "
                                f"never downloaded or loaded [snapshot {path}]")
    return path


def _hub_error(e: Exception, label: str, repo_id: str, revision: str | None, offline: bool, cache: str) -> str:
    """One line for a huggingface_hub failure while resolving `label`."""
    from huggingface_hub import utils as errors  # the error classes, where every huggingface_hub version has them

    try:
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:  # older huggingface_hub: no completeness check
        IncompleteSnapshotError = ()
    login = "run `hf auth login` or set HF_TOKEN"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, IncompleteSnapshotError):
        return (f"{label}: the cached snapshot in {cache} is incomplete and cannot be completed "
                f"{'with HF_HUB_OFFLINE=1 (offline)' if offline else 'now (the Hub cannot be reached)'}")
    if isinstance(e, errors.LocalEntryNotFoundError):
        if offline:
            return (f"{label}: not a local directory, and not in the Hugging Face cache {cache}; HF_HUB_OFFLINE=1 "
                    "forbids downloading it (download it once online, or point HF_HUB_CACHE at a cache that has it)")
        return (f"{label}: the Hugging Face Hub cannot be reached and the repo is not in the cache {cache} "
                f"({one_line_error(e.__cause__ or e)})")
    if isinstance(e, errors.GatedRepoError):
        return (f"{label}: gated repository: request access on https://huggingface.co/{repo_id}, then {login}")
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{label}: revision {revision!r} not found in the Hugging Face repo {repo_id}"
    if isinstance(e, errors.RepositoryNotFoundError):
        return (f"{label}: not a local directory, and no such Hugging Face repo (if it is private, {login})")
    if isinstance(e, errors.DisabledRepoError):
        return f"{label}: the Hugging Face repo is disabled"
    if status in (401, 403):
        return f"{label}: access denied by the Hugging Face Hub (HTTP {status}); {login}"
    if isinstance(e, errors.HfHubHTTPError):
        return f"{label}: download from the Hugging Face Hub failed ({one_line_error(e)})"
    if isinstance(e, ValueError):  # HFValidationError: a name the Hub would never accept
        return f"{label}: not a valid Hugging Face repo id ({one_line_error(e)})"
    return f"{label}: cannot fetch the repo into the Hugging Face cache {cache} ({one_line_error(e)})"


def read_config(model_dir: pathlib.Path) -> dict:
    path = pathlib.Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ParallelCompError(f"{path}: missing (not a Hugging Face model directory)")
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ParallelCompError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def generation_eos_ids(model_dir: pathlib.Path) -> tuple[int, ...]:
    """The ``eos_token_id`` ids of ``generation_config.json`` (none without the file). transformers' generate
    stops on these, and they may differ from config.json's: Qwen2.5/Qwen3 instruct models list both
    <|im_end|> and <|endoftext|> there, config.json only one of them. Decoding stops on both sets."""
    from parallelcomp_triton.model import eos_ids

    path = pathlib.Path(model_dir) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return ()
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ParallelCompError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return eos_ids(cfg.get("eos_token_id"), source=str(path))


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
    args.eos_token_ids = tuple(dict.fromkeys(args.eos_token_ids + generation_eos_ids(model_dir)))
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
            raise ParallelCompError(f"{path}: unexpected tensor {key} "
                                    f"(not part of a {args.num_layers}-layer {args.model_type} model)")
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
    """(``Transformer``, tokenizer) for an HF model directory or Hub repo id; ``None`` loads the bundled
    SmolLM2-135M."""
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
