"""Stage 3, scoring and eviction: the question over every chunk's K/V, chunk eviction, KV selection.

`prefill` runs the stage over a document's chunks as `encode.chunk_batches` hands them over, one batch at a
time: score the batch (`score_chunks`), keep each document's K best chunks (`keep_best`, the one eviction
rule), then select the KV of the batch's survivors only (`compress`); a batch's full K/V is freed before the
next one, so memory stays bounded by K chunks plus one batch.

`score_chunks` takes chunks whose K/V `encode.encode_chunks` computed (just now, or stored in an encoding)
and runs only the question suffix rows through the model, at positions len(prefix) + len(chunk) + i, each
attending to [prefix K/V, chunk K/V, its own suffix K/V] (varlen: Lq = suffix length, Lk = prefix + chunk +
suffix, causal bottom-right aligned). That yields exactly what one causal pass over prefix + chunk + suffix
yields for those rows: the question NLL given the chunk (which ranks it) and the window scores of the
suffix's last w rows over the chunk's keys (which choose the KV kept by select_kv / gather_kv).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from .cache import ChunkCache, ChunkKV
from .encode import chunk_batches, chunks_per_batch, progress_bar
from .kernels.chunk_attention import chunk_attention
from .kernels.select_kv import gather_kv, select_kv
from .prompt import score_rows
from .transfer import to_device


@dataclass
class ScoreItem:
    """One chunk to score: its K/V, its document's prefix K/V (empty lists without a prefix) and question."""

    index: int                        # chunk index in its document
    kv: ChunkKV
    prefix_keys: list[torch.Tensor]   # per layer [H_kv, p, d]
    prefix_values: list[torch.Tensor]
    suffix: list[int]                 # question suffix tokens
    scored: tuple[int, int]           # the suffix tokens the NLL averages
    window: int                       # score window rows (0: no scores needed)

    @property
    def prefix_len(self) -> int:
        return self.prefix_keys[0].shape[1] if self.prefix_keys else 0


@torch.no_grad()
def score_chunks(model, items: list[ScoreItem], budget: int | None, pool_kernel: int, gqa_reduce: str,
                 backend: str = "auto", observer=None, defer: bool = False) -> list[ChunkCache]:
    """Question NLL and compressed KV (B = `budget` per layer and KV head, None: all) of every item, packed
    in one model call; one ChunkCache per item. `observer.chunk_scores(layer, chunk, scores [n, H_kv],
    kept [H_kv, n'] | None)` sees the window scores over each chunk's keys. With `defer` (and a budget, and
    no observer) the KV selection is left `pending` on each cache for `compress`, to run on the chunks that
    survive eviction only."""
    device = model.embed_tokens.weight.device
    m_lens = [len(it.suffix) for it in items]
    q_off = [0] + list(accumulate(m_lens))
    ids = to_device([t for it in items for t in it.suffix], torch.long, device)
    pos = torch.cat([torch.arange(it.prefix_len + it.kv.length, it.prefix_len + it.kv.length + m, device=device)
                     for it, m in zip(items, m_lens)])
    # Runs of neighbours that share one score window: chunk_attention takes one window per call.
    runs, i = [], 0
    while i < len(items):
        j = i
        while j < len(items) and items[j].window == items[i].window:
            j += 1
        k_lens = [items[x].prefix_len + items[x].kv.length + m_lens[x] for x in range(i, j)]
        bounds_q, bounds_k = [0] + list(accumulate(m_lens[i:j])), [0] + list(accumulate(k_lens))
        runs.append((i, j, bounds_q, bounds_k, to_device(bounds_q, torch.int32, device),
                     to_device(bounds_k, torch.int32, device), items[i].window))
        i = j
    ctx_lens = [it.kv.length for it in items]
    caches = [ChunkCache(index=it.index, context_len=it.kv.length, positions=[] if budget is not None else None)
              for it in items]

    layer_scores = []  # per layer: the window scores over every item's own keys, [sum ctx_lens, H_kv]

    def attend(layer, q, k, v):
        outs, ctx_scores = [], []
        for a, b, bounds_q, k_starts, cu_q, cu_k, window in runs:
            # Packed [H_kv, sum Lk, d] (the stored layout, so the concatenation copies whole rows) and
            # passed transposed: chunk_attention takes [total_k, H_kv, d] views of any strides.
            ks, vs = [], []
            for x in range(a, b):
                it = items[x]
                if it.prefix_keys:
                    ks.append(it.prefix_keys[layer])
                    vs.append(it.prefix_values[layer])
                ks += [it.kv.keys[layer], k[q_off[x]:q_off[x + 1]].transpose(0, 1)]
                vs += [it.kv.values[layer], v[q_off[x]:q_off[x + 1]].transpose(0, 1)]
            k_run, v_run = torch.cat(ks, dim=1).transpose(0, 1), torch.cat(vs, dim=1).transpose(0, 1)
            out, _, scores = chunk_attention(q[q_off[a]:q_off[b]], k_run, v_run, cu_q, cu_k,
                                             causal=True, score_window=window, score_reduce=gqa_reduce,
                                             return_lse=False, backend=backend, bounds_q=bounds_q,
                                             bounds_k=k_starts)
            outs.append(out)
            if scores is not None:
                for x in range(a, b):
                    start = k_starts[x - a] + items[x].prefix_len
                    ctx_scores.append(scores[start:start + ctx_lens[x]])
        if budget is None:
            for x, (cache, it) in enumerate(zip(caches, items)):
                # .contiguous(): a GPU batch's chunks are views of one buffer (encode_chunks); a survivor
                # must not hold the whole batch alive (a no-op for the CPU's compact chunks).
                cache.keys.append(it.kv.keys[layer].contiguous())
                cache.values.append(it.kv.values[layer].contiguous())
                if observer is not None and ctx_scores:
                    observer.chunk_scores(layer, cache.index, ctx_scores[x], None)
        else:
            layer_scores.append(torch.cat(ctx_scores))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # The NLL averages the scored suffix tokens only, so the final hidden states read are the rows that
    # predict them (the chunk's last token, stored with its K/V, predicts suffix token 0); the last layer
    # projects and MLPs these alone, and the LM head runs on these alone.
    rows, targets = [], []
    for x, it in enumerate(items):
        a, b = it.scored
        rows += [q_off[x] + t - 1 for t in range(max(a, 1), b)]
        targets += [q_off[x] + t for t in range(a, b)]
    hidden = model(ids, pos, attend, out_rows=to_device(rows, torch.long, device))
    if budget is not None:
        starts = [0] + list(accumulate(ctx_lens))
        for x, (cache, it) in enumerate(zip(caches, items)):
            cache.pending = (it.kv, [scores[starts[x]:starts[x + 1]] for scores in layer_scores])
        if not defer or observer is not None:
            compress(caches, budget, pool_kernel, backend, observer)
    parts, h = [], 0
    for it in items:
        a, b = it.scored
        if a == 0 < b:
            parts.append(it.kv.hidden[None].to(hidden.dtype))
        n = max(0, b - max(a, 1))
        parts.append(hidden[h:h + n])
        h += n
    losses = model.token_nll(torch.cat(parts), ids[to_device(targets, torch.long, device)])
    # One read of the NLLs per batch, not one per chunk.
    nan = losses.new_full((), float("nan"))
    means = [part.mean() if part.numel() else nan
             for part in losses.split([max(0, b - a) for a, b in (it.scored for it in items)])]
    for cache, nll in zip(caches, torch.stack(means).tolist() if means else []):
        cache.nll = nll
    return caches


def compress(caches: list[ChunkCache], budget: int, pool_kernel: int, backend: str = "auto", observer=None) -> None:
    """KV eviction for the caches still `pending`, every layer at once: one select_kv over all (layer,
    chunk) window scores (per-call overhead, not arithmetic, dominates it at a chunk's size), then each
    chunk's kept K/V gathered from its own full K/V, in layer order; the full K/V is then let go."""
    caches = [c for c in caches if c.pending is not None]
    if not caches:
        return
    layers = len(caches[0].pending[1])
    ctx_lens = [c.context_len for c in caches]
    device = caches[0].pending[1][0].device
    ctx_cu = to_device([0] + list(accumulate(ctx_lens * layers)), torch.int32, device)
    scores = torch.cat([c.pending[1][layer] for layer in range(layers) for c in caches])
    keep_idx, _ = select_kv(scores, ctx_cu, budget, pool_kernel=pool_kernel, backend=backend)
    keep_idx = keep_idx.view(layers, len(caches), *keep_idx.shape[1:])
    for x, cache in enumerate(caches):
        kv, layer_scores = cache.pending
        n = min(budget, cache.context_len)
        item_cu = to_device([0, cache.context_len], torch.int32, device)
        for layer in range(layers):
            keep = keep_idx[layer, x:x + 1]
            k_c, v_c = gather_kv(kv.keys[layer].transpose(0, 1), kv.values[layer].transpose(0, 1), item_cu, keep,
                                 backend=backend)
            cache.keys.append(k_c[0, :, :n].contiguous())
            cache.values.append(v_c[0, :, :n].contiguous())
            cache.positions.append(keep[0, :, :n])
            if observer is not None:
                observer.chunk_scores(layer, cache.index, layer_scores[layer], keep[0, :, :n])
        cache.pending = None


def keep_best(chunks, keep: int, nll_of=lambda c: c.nll, index_of=lambda c: c.index) -> list:
    """Chunk eviction: the `keep` chunks with the lowest question NLL survive (ties: the earlier chunk; NaN
    last). `nll_of` / `index_of` read them from other records than ChunkCache (e.g. (chunk, nll) pairs)."""
    return sorted(chunks, key=lambda c: (_nan_last(nll_of(c)), index_of(c)))[:keep]


def _nan_last(x: float) -> float:
    return float("inf") if x != x else x


@dataclass
class PrefillState:
    """What the prefill keeps of one document: its prefix K/V, its K best compressed chunks (document order
    once all its chunks are scored), every chunk's question NLL, and the most chunk caches alive at once."""

    nll: list[float | None]
    prefix_keys: list[torch.Tensor] = field(default_factory=list)  # per layer [H_kv, p, d] (empty: no prefix)
    prefix_values: list[torch.Tensor] = field(default_factory=list)
    kept: list[ChunkCache] = field(default_factory=list)
    alive_max: int = 0


def prefill(model, cfg, plans, work: list[tuple[int, int]], backend: str = "auto", read_ahead=None,
            progress: bool = False, observer=None, on_document_done=None) -> list[PrefillState]:
    """Score the chunks `work` = [(document, chunk)] of `plans` batch by batch (packed varlen across
    documents) and keep each document's `keep` best compressed caches. Per batch: the chunks' full K/V
    (`chunk_batches`), the question over them (`score_chunks`), chunk eviction, KV selection for the
    batch's survivors (`compress`). `on_document_done(d, state)` runs once all of document d's chunks in
    `work` are scored."""
    # One config for every document: budget and mode are shared.
    budget, append_question = plans[0].budget, plans[0].append_question
    need_scores = budget is not None or observer is not None
    states = [PrefillState(nll=[None] * len(plan.spans)) for plan in plans]
    remaining = collections.Counter(d for d, _ in work)
    bar = progress_bar(len(work), "chunks", progress)
    longest = max(e - s for plan in plans for s, e in plan.spans)
    per_batch = chunks_per_batch(cfg, model.embed_tokens.weight.device, longest)
    for batch, kvs, prefixes in chunk_batches(model, [plan.source for plan in plans], work, per_batch, backend,
                                              read_ahead):
        for d, (keys, values) in prefixes.items():
            states[d].prefix_keys, states[d].prefix_values = keys, values
        if append_question:
            items = []
            for (d, c), kv in zip(batch, kvs):
                toks = plans[d].toks
                items.append(ScoreItem(
                    index=c, kv=kv, prefix_keys=states[d].prefix_keys, prefix_values=states[d].prefix_values,
                    suffix=toks.suffix, scored=toks.question if cfg.score_tokens == "question" else (0, len(toks.suffix)),
                    window=score_rows(toks, cfg.score_window) if need_scores else 0))
            caches = score_chunks(model, items, budget, cfg.pool_kernel, cfg.gqa_reduce, backend, observer,
                                  defer=True)
            del items
        else:  # one chunk holding the whole (or truncated) document: nothing to score or evict
            caches = [ChunkCache(index=c, context_len=kv.length, keys=kv.keys, values=kv.values)
                      for (_, c), kv in zip(batch, kvs)]
        del kvs, prefixes
        new_by_doc: dict[int, list[ChunkCache]] = collections.defaultdict(list)
        for (d, _), cache in zip(batch, caches):
            new_by_doc[d].append(cache)
        del caches
        for d, new in new_by_doc.items():
            state = states[d]
            if append_question:
                for cache in new:
                    state.nll[cache.index] = cache.nll
            state.alive_max = max(state.alive_max, len(state.kept) + len(new))
            state.kept = keep_best(state.kept + new, plans[d].keep)
            if budget is not None:  # KV selection for the batch's chunks that survived eviction only
                compress(state.kept, budget, cfg.pool_kernel, backend)
            remaining[d] -= len(new)
            if remaining[d] == 0:
                state.kept.sort(key=lambda c: c.index)
                if on_document_done is not None:
                    on_document_done(d, state)
        del new_by_doc
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return states
