"""Stage 2, chunk encoding: every chunk's full K/V, which does not depend on the question.

Attention is causal and the question comes after the chunk, so a chunk's own K/V (and the shared prompt
prefix's) are the same for every question. `encode_chunks` computes them for a batch of chunks in one packed
varlen causal pass over prefix + chunk; `chunk_batches` is the one loop that batches chunks for it (or reads
them from an encoding), used by fresh answers, by `write_encoding` and by every distributed rank, so that a
chunk is always computed in the same company and encoded answers equal fresh ones.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch

from .cache import ChunkKV
from .kernels.chunk_attention import chunk_attention
from .read_ahead import ReadAhead
from .storage import AtomicDir, EncodedDocument, encoding_meta
from .transfer import to_device


GPU_BATCH_TOKENS = 16384


def chunks_per_batch(cfg, device, chunk_len: int) -> int:
    """Chunks per prefill forward: `cfg.batch_chunks`, or more where `cfg.batch_tokens` (on CUDA by default
    GPU_BATCH_TOKENS) asks for larger batches of chunks of up to `chunk_len` tokens."""
    tokens = cfg.batch_tokens
    if tokens is None:
        tokens = GPU_BATCH_TOKENS if torch.device(device).type == "cuda" else 0
    return max(cfg.batch_chunks, tokens // max(1, chunk_len))


@dataclass(frozen=True)
class ChunkSource:
    """Where a document's chunks come from: its tokens cut at `spans`, or, per chunk, an encoding and the
    chunk's index in it (`stored[c]`; None: encode that chunk on the fly)."""

    prefix: list[int]                    # the shared prompt prefix (encoded once per document)
    document: list[int]
    spans: tuple[tuple[int, int], ...]
    stored: tuple[tuple[EncodedDocument, int] | None, ...] | None = None

    def stored_at(self, c: int) -> tuple[EncodedDocument, int] | None:
        return self.stored[c] if self.stored is not None else None


@torch.no_grad()
def encode_chunks(model, seqs: list[tuple[list[int], list[int]]], capture_prefix: list[bool] | None = None,
                  backend: str = "auto") -> tuple[list[ChunkKV], list[tuple[list, list] | None]]:
    """One packed varlen causal pass over `seqs` = [(prefix ids, chunk ids)], each at positions 0.. .

    Returns per sequence its chunk's ChunkKV, and per sequence the prefix K/V (keys, values per layer
    [H_kv, p, d]) where `capture_prefix[i]` asks for it (None elsewhere): the prefix sees only itself, so one
    copy serves every chunk of its document. Only the last row of every sequence is carried through the
    final layer's projection and MLP (its hidden state is all the question pass needs)."""
    device = model.embed_tokens.weight.device
    layers = model.args.num_layers
    capture_prefix = capture_prefix or [False] * len(seqs)
    ids, lens = [], []
    for prefix, chunk in seqs:
        ids.extend(prefix)
        ids.extend(chunk)
        lens.append(len(prefix) + len(chunk))
    starts = [0] + list(accumulate(lens))
    ids_t = to_device(ids, torch.long, device)
    pos_t = torch.cat([torch.arange(n, device=device) for n in lens])
    cu = to_device(starts, torch.int32, device)
    keys = [[None] * layers for _ in seqs]
    values = [[None] * layers for _ in seqs]
    prefixes = [([None] * layers, [None] * layers) if want else None for want in capture_prefix]

    # On a GPU the batch's K/V go to the stored [H_kv, n, d] layout in one copy per layer and each chunk is a
    # view of it (a copy per chunk is a launch per chunk and layer); on a CPU each chunk gets its own compact
    # copy, which the CPU paths downstream read faster.
    batch_copy = device.type == "cuda"

    def attend(layer, q, k, v):
        out, _, _ = chunk_attention(q, k, v, cu, cu, causal=True, return_lse=False, backend=backend,
                                    bounds_q=starts, bounds_k=starts)
        if batch_copy:
            k_all, v_all = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
        for i, (prefix, _) in enumerate(seqs):
            a, p, b = starts[i], starts[i] + len(prefix), starts[i + 1]
            if batch_copy:
                keys[i][layer], values[i][layer] = k_all[:, p:b], v_all[:, p:b]
            else:
                keys[i][layer] = k[p:b].transpose(0, 1).contiguous()
                values[i][layer] = v[p:b].transpose(0, 1).contiguous()
            if prefixes[i] is not None:  # kept until the merge: its own copy, not a view of the batch
                prefixes[i][0][layer] = k[a:p].transpose(0, 1).contiguous()
                prefixes[i][1][layer] = v[a:p].transpose(0, 1).contiguous()
        return out

    last = to_device([b - 1 for b in starts[1:]], torch.long, device)
    hidden = model(ids_t, pos_t, attend, out_rows=last)
    return [ChunkKV(k, v, h) for k, v, h in zip(keys, values, hidden.unbind(0))], prefixes


def chunk_batches(model, sources: list[ChunkSource], work: list[tuple[int, int]], batch_chunks: int,
                  backend: str = "auto", read_ahead: ReadAhead | None = None):
    """Yield (batch, K/V per chunk, new prefixes) for the chunks `work` = [(source, chunk)], `batch_chunks`
    at a time in order: one packed `encode_chunks` pass over the batch's chunks of plain documents, a read of
    the others' from their encoding. `new prefixes` maps a source to its prefix K/V (keys, values per layer)
    the first time one of its chunks comes by. With `read_ahead`, the next batch's stored chunks are read in
    the background while the caller works on this one. The caller should drop each batch's K/V before
    asking for the next, so that one batch is alive at a time."""
    device = model.embed_tokens.weight.device
    seen: set[int] = set()
    for first in range(0, len(work), batch_chunks):
        batch = work[first:first + batch_chunks]
        if read_ahead is not None:
            ahead = work[first + batch_chunks:first + 2 * batch_chunks]
            stored = [sources[d].stored_at(c) for d, c in ahead]
            paths = [encoded.chunk_path(index) for encoded, index in filter(None, stored)]
            if paths:
                read_ahead.submit(paths)
        kvs: list[ChunkKV | None] = [None] * len(batch)
        prefixes: dict[int, tuple[list, list]] = {}
        fresh = [i for i, (d, c) in enumerate(batch) if sources[d].stored_at(c) is None]
        if fresh:
            seqs, capture = [], []
            for i in fresh:
                d, c = batch[i]
                s, e = sources[d].spans[c]
                seqs.append((sources[d].prefix, sources[d].document[s:e]))
                capture.append(bool(sources[d].prefix) and d not in seen)
                seen.add(d)
            encoded, captured = encode_chunks(model, seqs, capture, backend)
            for i, kv, prefix in zip(fresh, encoded, captured):
                kvs[i] = kv
                if prefix is not None:
                    prefixes[batch[i][0]] = prefix
            del encoded, captured
        for i, (d, c) in enumerate(batch):
            at = sources[d].stored_at(c)
            if at is not None:
                encoded, index = at
                if sources[d].prefix and d not in seen:
                    prefixes[d] = encoded.load_prefix(device)
                seen.add(d)
                kvs[i] = encoded.load_chunk(index, device)
        yield batch, kvs, prefixes
        del kvs, prefixes


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", leave=False)


def write_chunks(writer: AtomicDir, model, source: ChunkSource, batch_chunks: int, chunks: range,
                 backend: str = "auto", bar=None) -> None:
    """Encode the chunks `chunks` of `source` (`chunk_batches`, from the range's first chunk) and write each
    one's file into `writer`, and the prefix's with chunk 0."""
    work = [(0, c) for c in chunks]
    for batch, kvs, prefixes in chunk_batches(model, [source], work, batch_chunks, backend):
        if 0 in prefixes and chunks.start == 0:
            writer.save_prefix(*prefixes[0])
        for (_, c), kv in zip(batch, kvs):
            writer.save_chunk(c, kv)
        del kvs, prefixes
        if bar is not None:
            bar.update(len(batch))


def write_encoding(model, tokenizer, model_source: str, prefix: list[int], document: list[int],
                   spans: list[tuple[int, int]], settings: dict, path=None, backend: str = "auto",
                   progress: bool = False) -> EncodedDocument:
    """Encode `document` cut at `spans` (`write_chunks` over every chunk) and write it to directory `path`
    (None: a temporary one the returned object owns). `settings`: the config fields that shaped it, kept in
    meta.json."""
    meta = encoding_meta(model, tokenizer, model_source, prefix, document, spans, settings)
    owned = path is None
    final = Path(tempfile.mkdtemp(prefix="parallelcomp-encoding-")) / "encoding" if owned else Path(path)
    writer = AtomicDir(final, settings.get("kv_store", "exact"))
    bar = progress_bar(len(spans), "encoding", progress)
    try:
        write_chunks(writer, model, ChunkSource(prefix, document, tuple(spans)), settings["batch_chunks"],
                     range(len(spans)), backend, bar)
        writer.commit(meta)
    except BaseException:
        writer.abort()
        if owned:
            shutil.rmtree(final.parent, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    meta["files"] = dict(writer.files)
    encoded = EncodedDocument(final, meta)
    return encoded.remove_when_collected(final.parent) if owned else encoded
