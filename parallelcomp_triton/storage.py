"""Encodings on disk: the format, its compatibility checks, and the atomic directory they are written in
(read_ahead.py brings their files in while the previous batch is scored).

An encoding is a directory:

    meta.json                  settings that shaped it (format version, model identity, dtype, template
                               prefix tokens, document tokens, chunk spans, chunking settings), written last
    prefix.safetensors         k.{layer}, v.{layer} [H_kv, p, d] of the shared prompt prefix (once)
    chunk_00012.safetensors    k.{layer}, v.{layer} [H_kv, n, d] of chunk 12, and `hidden` [hidden size]:
                               the final hidden state of its last token (it predicts the question's first token)

The chunks' K/V are kept as the model computed them (kv_store "exact": answers equal a fresh run's) or at one
byte per value (kv_store "int8", about half the size): symmetric int8 with a float32 scale per channel for
keys (k_scale.{layer} [H_kv, 1, d]: keys carry outlier channels) and per token for values (v_scale.{layer}
[H_kv, n, 1]), turned back into the model's dtype when read. The prefix and `hidden` are always exact.

It is written into a sibling temporary directory, every file fsynced, meta.json last, then renamed into
place, so a directory that is there is complete; one without meta.json is refused. meta.json lists every
file with its size and the crc32 of its bytes as written (`files`: {name: {"bytes", "crc32"}}). Loading
checks the format version, the model, dtype, file sizes and headers; every byte is checked when it is
read: a file's checksum is verified before its K/V is used (by the read-ahead, on another core, for every
batch of chunks but the first; by the load itself otherwise), and a mismatch is refused in one line.
Chunk files are memory-mapped and read one prefill batch at a time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from .cache import ChunkKV
from .config import KV_STORES
from .errors import ParallelCompError
from .read_ahead import CHECKSUMS, Crc32, file_checksum, file_identity

FORMAT = "parallelcomp-encoding"
VERSION = 2  # 2: files carry checksums
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8"}
# The config fields an encoding depends on besides the model: how the document is cut, then the prompt
# prefix. An answer must chunk as its encoding did; EncodedDocument.config takes all of them.
CHUNKING_SETTINGS = ("chunk_tokens", "snap_to_sentences", "window")
PROMPT_SETTINGS = ("template", "instruction", "prompt")


def encoding_settings(cfg, trained_window: int) -> dict:
    """The settings an encoding made under `cfg` records (the window resolved to the model's)."""
    settings = {"mode": cfg.mode, **{name: getattr(cfg, name) for name in CHUNKING_SETTINGS + PROMPT_SETTINGS}}
    settings["window"] = cfg.window or trained_window
    settings["kv_store"] = cfg.kv_store
    return settings


def quantize_int8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of `x` with one float32 scale per slice along `dim` (the absolute maximum maps to
    127): (values int8, scales float32 with `dim` of size 1)."""
    x = x.float()
    scale = x.abs().amax(dim=dim, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero slice: any scale is exact
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`quantize_int8`'s inverse, in `dtype` (the product rounded once, from float32)."""
    return (q.float() * scale).to(dtype)


def encoding_meta(model, tokenizer, source: str, prefix: list[int], document: list[int],
                  spans: list[tuple[int, int]], settings: dict) -> dict:
    """meta.json of an encoding (without its file list): model identity, dtype, shapes, the settings that
    shaped it (`settings`: config fields; `batch_chunks` kept apart), prefix and document tokens, spans."""
    a = model.args
    return {"format": FORMAT, "version": VERSION, "model": model_identity(model, tokenizer), "model_source": source,
            "dtype": dtype_name(model.embed_tokens.weight.dtype), "num_layers": a.num_layers,
            "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim, "hidden_size": a.hidden_size,
            "settings": {k: v for k, v in settings.items() if k != "batch_chunks"},
            "batch_chunks": settings["batch_chunks"], "prefix": prefix, "document": document,
            "spans": [list(s) for s in spans]}


def model_identity(model, tokenizer) -> str:
    """A fingerprint of the model and tokenizer an encoding belongs to: the model's shape fields, the
    tokenizer's full definition, and a sample of every weight (first and last 64 values, rounded to bfloat16
    so that the same checkpoint loaded in another dtype hashes alike: the dtype is checked on its own)."""
    cached = getattr(model, "_parallelcomp_identity", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(model.args), sort_keys=True, default=str).encode())
    backend_tok = getattr(tokenizer, "backend_tokenizer", None)
    if backend_tok is not None:
        h.update(backend_tok.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token_id, bool(getattr(tokenizer, "add_bos_token", False))]).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = torch.cat([flat[:64], flat[-64:]]).to(torch.bfloat16).float().cpu()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    ident = h.hexdigest()[:32]
    model._parallelcomp_identity = ident
    return ident


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def chunk_file(c: int) -> str:
    return f"chunk_{c:05d}.safetensors"


class EncodedDocument:
    """A document encoded once (`ParallelComp.encode`): per chunk and layer the full K/V, the prefix K/V once,
    and the settings that shaped them (`meta`). Pass it instead of the context to `generate` /
    `generate_batch`; `save(dir)` keeps it, `ParallelComp.load_encoded(dir)` reads it back. One made without
    a path lives in a temporary directory it owns, removed by `close()` or when it is garbage collected."""

    def __init__(self, path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self._finalizer = None  # set by remove_when_collected

    # -------------------------------------------------------------- settings
    @property
    def prefix(self) -> list[int]:
        return self.meta["prefix"]

    @property
    def document(self) -> list[int]:
        return self.meta["document"]

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [tuple(s) for s in self.meta["spans"]]

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def kv_store(self) -> str:
        """How the chunks' K/V are kept: "exact" (the model's dtype) or "int8" (see the module's docstring)."""
        return self.meta["settings"].get("kv_store", "exact")

    def settings(self) -> dict:
        """The config fields that shaped the encoding (chunking and prompt prefix)."""
        return dict(self.meta["settings"])

    def config(self, config=None):
        """`config` (defaults if None) with this encoding's chunking, prompt and batch settings, so that
        answers equal a fresh `generate` under that config (`batch_chunks`: the batches it was encoded in,
        `batch_tokens` 0: no larger ones)."""
        from .config import ParallelCompConfig

        made = self.settings()
        return dataclasses.replace(config if config is not None else ParallelCompConfig(), mode="parallelcomp",
                                   **{name: made[name] for name in CHUNKING_SETTINGS + PROMPT_SETTINGS},
                                   batch_chunks=self.meta["batch_chunks"], batch_tokens=0, kv_store=self.kv_store)

    def __repr__(self) -> str:
        store = "" if self.kv_store == "exact" else f", K/V {self.kv_store}"
        return (f"EncodedDocument({str(self.path)!r}, {len(self.document)} tokens, {len(self.spans)} chunks, "
                f"{self.dtype}{store})")

    # -------------------------------------------------------------- reading
    def _open(self, name: str, device):
        from safetensors import safe_open

        try:
            return safe_open(str(self.path / name), framework="pt", device=str(device))
        except Exception as e:  # missing, truncated or corrupt file
            raise ParallelCompError(f"encoding {self.path}: {name} is unreadable ({_one_line(e)})") from None

    def verify(self, name: str) -> None:
        """Refuse, in one line, file `name` unless its bytes have the checksum meta.json records: the one
        the read-ahead computed while reading it, if it did and the file is unchanged since, else read now."""
        path = self.path / name
        expected = self.meta["files"][name]["crc32"]
        read = CHECKSUMS.take(str(path))
        try:
            if read is None or read[0] != file_identity(path.stat()):
                read = file_checksum(path)
        except OSError as e:
            raise ParallelCompError(f"encoding {self.path}: {name} is unreadable ({e.strerror or e})") from None
        if read[1] != expected:
            raise ParallelCompError(f"encoding {self.path}: {name} is corrupt (checksum mismatch); "
                                    "encode the document again")

    def load_prefix(self, device="cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layers = self.meta["num_layers"]
        self.verify("prefix.safetensors")
        with self._open("prefix.safetensors", device) as f:
            return ([f.get_tensor(f"k.{l}") for l in range(layers)], [f.get_tensor(f"v.{l}") for l in range(layers)])

    def load_chunk(self, c: int, device="cpu") -> ChunkKV:
        layers = self.meta["num_layers"]
        self.verify(chunk_file(c))
        with self._open(chunk_file(c), device) as f:
            try:
                if self.kv_store == "int8":
                    dtype = _DTYPES[self.dtype]
                    return ChunkKV([dequantize_int8(f.get_tensor(f"k.{l}"), f.get_tensor(f"k_scale.{l}"), dtype)
                                    for l in range(layers)],
                                   [dequantize_int8(f.get_tensor(f"v.{l}"), f.get_tensor(f"v_scale.{l}"), dtype)
                                    for l in range(layers)], f.get_tensor("hidden"))
                return ChunkKV([f.get_tensor(f"k.{l}") for l in range(layers)],
                               [f.get_tensor(f"v.{l}") for l in range(layers)], f.get_tensor("hidden"))
            except Exception as e:
                raise ParallelCompError(f"encoding {self.path}: {chunk_file(c)} is corrupt ({_one_line(e)})") from None

    def chunk_path(self, c: int) -> Path:
        return self.path / chunk_file(c)

    # -------------------------------------------------------------- keeping
    def save(self, path, kv_store: str | None = None) -> "EncodedDocument":
        """Copy the encoding to directory `path` (atomically: a temporary sibling renamed into place) and
        return it as an EncodedDocument read from there. `kv_store` "int8" keeps an exact encoding's chunk
        K/V at one byte per value there (the same files `encode` with kv_store="int8" writes); None: as it is."""
        path = Path(path)
        kv_store = kv_store or self.kv_store
        if kv_store not in KV_STORES:
            raise ParallelCompError(f"kv_store {kv_store!r}: expected one of {', '.join(KV_STORES)}")
        if kv_store != self.kv_store and self.kv_store != "exact":
            raise ParallelCompError(f"encoding {self.path}: its K/V are kept as {self.kv_store}; an exact copy "
                                    "needs the document encoded again")
        if path.resolve() == self.path.resolve():
            if kv_store != self.kv_store:
                raise ParallelCompError(f"encoding {self.path}: save it as {kv_store} to another directory")
            return self
        meta = self.meta
        if kv_store != self.kv_store:
            meta = dict(meta, settings=dict(meta["settings"], kv_store=kv_store))
        convert = {chunk_file(c): c for c in range(len(self.spans))} if kv_store != self.kv_store else {}
        writer = AtomicDir(path, kv_store)
        try:
            for name in sorted(self.meta["files"]):
                if name in convert:  # read (checksum verified), quantized, written
                    writer.save_chunk(convert[name], self.load_chunk(convert[name]))
                    continue
                writer.copy(self.path / name, name)
                if writer.files[name] != self.meta["files"][name]:  # damaged here: not passed on
                    raise ParallelCompError(f"encoding {self.path}: {name} is corrupt (checksum mismatch); "
                                            "encode the document again")
            writer.commit(meta)
        except BaseException:
            writer.abort()
            raise
        meta = dict(meta, files=dict(writer.files))
        return EncodedDocument(path, meta)

    def remove_when_collected(self, root) -> "EncodedDocument":
        """Own the temporary directory `root` (which holds this encoding): removed by `close()` or when this
        object is garbage collected."""
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(root), True)
        return self

    def close(self) -> None:
        """Remove the temporary directory of an encoding made without a path (a saved one stays)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class AtomicDir:
    """Build a directory in a temporary sibling; `commit` writes meta.json last and renames it into place."""

    def __init__(self, final, kv_store: str = "exact"):
        self.final = Path(final)
        self.kv_store = kv_store
        if self.final.exists() and not self.final.is_dir():
            raise ParallelCompError(f"{self.final}: exists and is not a directory")
        if self.final.is_dir() and any(self.final.iterdir()) and not (self.final / "meta.json").is_file():
            raise ParallelCompError(f"{self.final}: a non-empty directory that is not an encoding; "
                                    "choose a new directory")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".tmp", dir=self.final.parent))
        except OSError as e:
            raise ParallelCompError(f"{self.final}: cannot write ({e.strerror or e})") from None
        self.files: dict[str, dict] = {}  # name -> {"bytes": size, "crc32": hex} of each file written

    @classmethod
    def join(cls, final, tmp, kv_store: str = "exact") -> "AtomicDir":
        """A writer into the temporary directory `tmp` another process's AtomicDir(final) made (a distributed
        encoding: every rank writes its chunks there, the one that made it commits)."""
        writer = cls.__new__(cls)
        writer.final, writer.tmp, writer.files, writer.kv_store = Path(final), Path(tmp), {}, kv_store
        return writer

    def save_tensors(self, name: str, tensors: dict) -> None:
        from safetensors.torch import save

        data = save({k: t.contiguous().cpu() for k, t in tensors.items()})
        self._write(name, [data])

    def _write(self, name: str, pieces) -> None:
        """Write file `name` from the byte strings `pieces`, fsync it, and record its size and checksum."""
        target = self.tmp / name
        crc, size = Crc32(), 0
        with open(target, "wb") as f:
            for piece in pieces:
                crc.update(piece)
                size += len(piece)
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        self.files[name] = {"bytes": size, "crc32": crc.hexdigest()}

    def save_prefix(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.save_tensors("prefix.safetensors", {**{f"k.{l}": t for l, t in enumerate(keys)},
                                                 **{f"v.{l}": t for l, t in enumerate(values)}})

    def save_chunk(self, c: int, kv: ChunkKV) -> None:
        if self.kv_store == "int8":
            tensors = {"hidden": kv.hidden}
            for l, (k, v) in enumerate(zip(kv.keys, kv.values)):
                tensors[f"k.{l}"], tensors[f"k_scale.{l}"] = quantize_int8(k, dim=1)
                tensors[f"v.{l}"], tensors[f"v_scale.{l}"] = quantize_int8(v, dim=2)
            self.save_tensors(chunk_file(c), tensors)
            return
        self.save_tensors(chunk_file(c), {**{f"k.{l}": t for l, t in enumerate(kv.keys)},
                                          **{f"v.{l}": t for l, t in enumerate(kv.values)}, "hidden": kv.hidden})

    def copy(self, src: Path, name: str, block: int = 1 << 22) -> None:
        with open(src, "rb") as f:
            self._write(name, iter(lambda: f.read(block), b""))

    def commit(self, meta: dict) -> None:
        meta = dict(meta, files=dict(self.files))
        target = self.tmp / "meta.json"
        target.write_text(json.dumps(meta))
        _fsync(target)
        _fsync(self.tmp)
        final = self.final
        if final.is_dir() and any(final.iterdir()):  # an older encoding: move it aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / "x")
            os.replace(self.tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, final)  # replaces an empty directory too
        _fsync(final.parent)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(path) -> dict:
    """meta.json of an encoding directory, checked for format and version; one-line errors."""
    path = Path(path)
    if not path.is_dir():
        raise ParallelCompError(f"encoding {path}: no such directory")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise ParallelCompError(f"encoding {path}: no meta.json (incomplete or not an encoding)") from None
    except (OSError, ValueError) as e:
        raise ParallelCompError(f"encoding {path}: meta.json is unreadable ({_one_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ParallelCompError(f"encoding {path}: meta.json is not a {FORMAT}")
    if meta.get("version") != VERSION:
        raise ParallelCompError(f"encoding {path}: format version {meta.get('version')}, this package reads "
                                f"version {VERSION}; encode the document again")
    return meta


def open_encoding(path, model, tokenizer) -> EncodedDocument:
    """Read an encoding directory for this model and tokenizer: refuse (one line) another model, tokenizer or
    dtype, and a missing, truncated or corrupt file (sizes and headers here; each file's checksum when its
    K/V is read: reading all of a long document's files here would cost a full read of it per load)."""
    path = Path(path)
    meta = read_meta(path)
    enc = EncodedDocument(path, meta)
    check_model(enc, model, tokenizer)
    layers, kv_heads, head_dim = meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]
    dtype = _DTYPES[meta["dtype"]]
    if enc.kv_store not in KV_STORES:
        raise ParallelCompError(f"encoding {path}: K/V kept as {enc.kv_store!r}, this package reads "
                                f"{', '.join(KV_STORES)}")
    expected = {}  # file -> tensor name -> (shape, dtype)
    if meta["prefix"]:
        shape = [kv_heads, len(meta["prefix"]), head_dim]
        expected["prefix.safetensors"] = {f"{kv}.{l}": (shape, dtype) for kv in "kv" for l in range(layers)}
    for c, (s, e) in enumerate(meta["spans"]):
        shape = [kv_heads, e - s, head_dim]
        if enc.kv_store == "int8":
            expected[chunk_file(c)] = {f"{kv}.{l}": (shape, torch.int8) for kv in "kv" for l in range(layers)}
            expected[chunk_file(c)].update({f"k_scale.{l}": ([kv_heads, 1, head_dim], torch.float32)
                                            for l in range(layers)})
            expected[chunk_file(c)].update({f"v_scale.{l}": ([kv_heads, e - s, 1], torch.float32)
                                            for l in range(layers)})
        else:
            expected[chunk_file(c)] = {f"{kv}.{l}": (shape, dtype) for kv in "kv" for l in range(layers)}
        expected[chunk_file(c)]["hidden"] = ([meta["hidden_size"]], dtype)
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != set(expected):
        raise ParallelCompError(f"encoding {path}: meta.json does not list the expected files")
    for name, shapes in expected.items():
        listed = files[name]
        if not (isinstance(listed, dict) and isinstance(listed.get("bytes"), int)
                and isinstance(listed.get("crc32"), str)):
            raise ParallelCompError(f"encoding {path}: meta.json lists {name} without its size and checksum")
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            raise ParallelCompError(f"encoding {path}: {name} is missing") from None
        if size != listed["bytes"]:
            raise ParallelCompError(f"encoding {path}: {name} has {size} bytes, {listed['bytes']} expected "
                                    "(truncated or corrupt)")
        with enc._open(name, "cpu") as f:
            try:
                got = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            except Exception as e:
                raise ParallelCompError(f"encoding {path}: {name} is corrupt ({_one_line(e)})") from None
        if got != {k: (shape, _SAFETENSORS_DTYPES[t]) for k, (shape, t) in shapes.items()}:
            raise ParallelCompError(f"encoding {path}: {name} does not hold the tensors meta.json describes")
    return enc


def check_model(enc: EncodedDocument, model, tokenizer) -> None:
    """Refuse, in one line, an encoding made with another dtype, model or tokenizer."""
    dtype = dtype_name(model.embed_tokens.weight.dtype)
    if enc.meta["dtype"] != dtype:
        raise ParallelCompError(f"encoding {enc.path}: made in {enc.meta['dtype']}, the model runs in {dtype} "
                                f"(load it with dtype={enc.meta['dtype']!r}, or encode again)")
    if enc.meta["model"] != model_identity(model, tokenizer):
        raise ParallelCompError(f"encoding {enc.path}: made with another model or tokenizer "
                                f"({enc.meta.get('model_source') or 'unknown'}); encode again with this one")
