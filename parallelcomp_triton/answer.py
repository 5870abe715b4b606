"""Stage 4, answering: the kept chunks merged into one cache per document, the question re-encoded over it
(with attention-bias calibration in chosen layers), and decoding, every document of a batch together."""
from __future__ import annotations

import resource
import time

import torch

from .cache import CompressedKVCache
from .generation import sample_next
from .kernels.chunk_attention import chunk_attention
from .kernels.decode_attention import decode_attention
from .stats import GenerationResult, Stats
from .transfer import to_device


def new_cache(model, plans) -> CompressedKVCache:
    """An empty batched cache with one row per document, as long as the longest needs."""
    a = model.args
    weight = model.embed_tokens.weight
    return CompressedKVCache(a.num_layers, len(plans), a.num_kv_heads, a.num_heads, a.head_dim,
                             max(plan.capacity for plan in plans), weight.dtype, weight.device)


def merge(cache: CompressedKVCache, row: int, plan, state) -> None:
    """Copy the document's prefix and kept chunks (document order) into its cache row, then free them."""
    state.kept.sort(key=lambda c: c.index)
    has_prefix = bool(plan.toks.prefix)
    cache.fill_row(row, state.prefix_keys if has_prefix else None, state.prefix_values if has_prefix else None,
                   state.kept)
    for c in state.kept:
        c.release_kv()
    state.prefix_keys = state.prefix_values = []


def answer(model, tokenizer, cfg, plans, states, cache: CompressedKVCache, eos: set[int], backend: str = "auto",
           observer=None) -> list[GenerationResult]:
    """Question pass per document over its merged row, then batched decoding; one result per document."""
    logits, positions = question_passes(model, cfg, plans, states, cache, backend, observer)
    t = time.perf_counter()
    outs, steps = drain(decode_steps(model, cfg, cache, logits, positions, eos, backend,
                                     stop=stop_check(tokenizer, cfg.stop_strings)))
    return results(model, tokenizer, cfg, plans, states, outs, steps, time.perf_counter() - t)


def question_passes(model, cfg, plans, states, cache: CompressedKVCache, backend: str = "auto", observer=None):
    """Each document's question pass over its merged cache row (stats filled in); returns the last rows'
    logits [B, vocab] and each row's next position."""
    logits, positions = [], []
    for row, (plan, state) in enumerate(zip(plans, states)):
        st, spans, prefix_len = plan.stats, plan.spans, len(plan.toks.prefix)
        st.batch_documents = len(plans)
        st.chunk_spans = [list(s) for s in spans]
        st.chunk_documents = list(plan.chunk_documents) if plan.chunk_documents is not None else None
        st.chunk_nll = [None] * len(spans)
        for c in state.kept:
            st.chunk_nll[c.index] = c.nll
        st.chunk_nll_all = list(state.nll)
        st.kept_chunks = [c.index for c in state.kept]
        st.max_alive_chunk_caches = state.alive_max
        st.kv_tokens_per_layer_before = prefix_len + sum(e - s for s, e in spans)
        st.kv_tokens_per_layer_after = cache.lengths[row]
        st.kv_cache_bytes = cache.nbytes(row)
        # The question sits right after the longest kept chunk in the shared position range.
        p0 = prefix_len + max(c.context_len for c in state.kept)
        st.question_position = p0
        t = time.perf_counter()
        logits.append(question_pass(model, cfg, cache, row, plan.toks.suffix, p0, st, backend, observer))
        st.time_question_s = time.perf_counter() - t
        positions.append(p0 + len(plan.toks.suffix))
    return torch.cat(logits), positions


def results(model, tokenizer, cfg, plans, states, outs, steps: int, decode_s: float) -> list[GenerationResult]:
    """One GenerationResult per document from its decoded tokens (text cut before a stop string)."""
    out = []
    for plan, state, out_ids in zip(plans, states, outs):
        st = plan.stats
        st.time_decode_s = decode_s
        st.new_tokens = len(out_ids)
        st.decode_steps = steps
        st.decode_ms_per_token = 1000 * decode_s / steps if steps else 0.0
        st.time_total_s = time.perf_counter() - plan.t0
        st.peak_memory_bytes = peak_memory_bytes(model.embed_tokens.weight.device)
        text = cut_at_stop(tokenizer.decode(out_ids, skip_special_tokens=True), cfg.stop_strings)
        st.empty_answer = not text.strip()  # the CLI says so on stderr; callers can check here
        kept_positions = {c.index: c.positions for c in state.kept if c.positions is not None}
        out.append(GenerationResult(text=text, token_ids=out_ids, stats=st, kept_positions=kept_positions))
    return out


def stop_check(tokenizer, stop_strings):
    """A `stop(sequence, tokens)` for decode_steps: True once the decoded text holds a stop string (None
    without stop strings). Only the text's tail can hold a new match, so only that is decoded each step."""
    if not stop_strings:
        return None
    longest = max(len(x) for x in stop_strings)

    def stop(_, tokens) -> bool:
        tail = tokenizer.decode(tokens[-(longest + 8):], skip_special_tokens=True)
        return any(x in tail for x in stop_strings)

    return stop


def cut_at_stop(text: str, stop_strings) -> str:
    """`text` up to the first stop string (the stop string itself is not part of the answer)."""
    cut = min((i for i in (text.find(x) for x in stop_strings or ()) if i >= 0), default=len(text))
    return text[:cut]


def stream_texts(model, tokenizer, cfg, plans, states, cache: CompressedKVCache, eos: set[int], backend: str = "auto",
                 leave=None):
    """`answer` as a generator of (row, text piece), each piece yielded as soon as it is decoded and stable (no
    half of a multi-byte character, no start of a possible stop string); a row's pieces add up to its
    result's text, and the results are the generator's return value. `leave(row)`: True ends that row's
    decoding at its next step (a client that left; its result is then cut short). Closing it stops all."""
    logits, positions = question_passes(model, cfg, plans, states, cache, backend)
    t = time.perf_counter()
    stop_string = stop_check(tokenizer, cfg.stop_strings)

    def stop(row, tokens) -> bool:
        return bool((leave is not None and leave(row)) or (stop_string is not None and stop_string(row, tokens)))

    steps = decode_steps(model, cfg, cache, logits, positions, eos, backend,
                         stop=stop if leave is not None or stop_string is not None else None)
    tokens: list[list[int]] = [[] for _ in plans]
    emitted = [""] * len(plans)
    try:
        while True:
            try:
                pairs = next(steps)
            except StopIteration as done:
                outs, count = done.value
                break
            for row, token in pairs:
                tokens[row].append(token)
                text = cut_at_stop(tokenizer.decode(tokens[row], skip_special_tokens=True), cfg.stop_strings)
                stable = stable_prefix(text, cfg.stop_strings)
                if stable.startswith(emitted[row]) and len(stable) > len(emitted[row]):
                    yield row, stable[len(emitted[row]):]
                    emitted[row] = stable
    finally:
        steps.close()
    out = results(model, tokenizer, cfg, plans, states, outs, count, time.perf_counter() - t)
    for row, result in enumerate(out):
        if result.text.startswith(emitted[row]) and len(result.text) > len(emitted[row]):
            yield row, result.text[len(emitted[row]):]
    return out


def stable_prefix(text: str, stop_strings) -> str:
    """What of `text` can be shown now: not a trailing replacement character (a character whose bytes are
    not all decoded yet), not a tail that may still grow into a stop string."""
    text = text.rstrip("\ufffd")
    hold = max((n for x in stop_strings or () for n in range(1, len(x)) if text.endswith(x[:n])), default=0)
    return text[:len(text) - hold]


def drain(steps):
    """Run a decode_steps generator to its end; its return value: (tokens per row, steps)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def question_pass(model, cfg, cache: CompressedKVCache, row: int, suffix: list[int], p0: int, stats: Stats,
                  backend: str = "auto", observer=None) -> torch.Tensor:
    """Re-encode the question over cache row `row` at positions p0.., with attention-bias calibration in the
    configured layers; returns the last row's logits [1, vocab]."""
    device = model.embed_tokens.weight.device
    m, merged = len(suffix), cache.lengths[row]
    ids = to_device(suffix, torch.long, device)
    pos = torch.arange(p0, p0 + m, device=device)
    bounds_q, bounds_k = [0, m], [0, merged + m]
    cu_q, cu_k = to_device(bounds_q, torch.int32, device), to_device(bounds_k, torch.int32, device)
    cal = cfg.calibration
    masked_counts = {}

    def attend(layer, q, k, v):
        cache.append(layer, row, merged, k, v)
        k_all, v_all = cache.packed_view(layer, row, merged + m)
        key_mask = None
        if cal is not None and cal.first_layer <= layer <= cal.last_layer:
            rows = min(cal.rows, m)
            _, _, scores = chunk_attention(q, k_all, v_all, cu_q, cu_k, causal=True, score_window=rows,
                                           score_reduce="none", return_lse=False, backend=backend,
                                           bounds_q=bounds_q, bounds_k=bounds_k)
            key_mask = (scores / rows > cal.tau) & region_mask(cal, merged, m, device)[:, None]
            cache.set_key_mask(layer, row, key_mask)
            masked_counts[layer] = key_mask.sum(dim=0)  # read back once, after the pass
            if observer is not None:
                observer.calibration(layer, scores / rows, key_mask)
        out, _, _ = chunk_attention(q, k_all, v_all, cu_q, cu_k, causal=True, key_mask=key_mask,
                                    return_lse=False, backend=backend, bounds_q=bounds_q, bounds_k=bounds_k)
        return out

    hidden = model(ids, pos, attend, out_rows=to_device([m - 1], torch.long, device))
    cache.lengths[row] = merged + m
    if cal is not None:
        stats.calibration_masked_per_head = {layer: counts.tolist() for layer, counts in masked_counts.items()}
    return model.lm_head_rows(hidden)


def decode_steps(model, cfg, cache: CompressedKVCache, logits: torch.Tensor, positions: list[int], eos: set[int],
                 backend: str = "auto", stop=None):
    """Decode every row of `cache` together from `logits` [B, vocab], row b's next token at position
    positions[b]. A generator: yields after each step the (sequence, token) pairs chosen in it, and returns
    (tokens per row, EOS stripped; decode steps run). Closing it early stops decoding (a client that left).
    `stop(sequence, tokens)`: True ends that sequence after this token (a stop string in its text).

    A sequence that ends (EOS or max_new_tokens) leaves the batch at once: its cache row is compacted
    away (CompressedKVCache.keep_rows), so later steps spend no linear-layer, attention or logit work on it.
    Sampling uses one generator per sequence, seeded alike, so each row draws what it would alone."""
    device = model.embed_tokens.weight.device
    batch = cache.batch
    generators = None
    if cfg.temperature > 0:
        generators = []
        for _ in range(batch):
            generators.append(torch.Generator(device=device))
            generators[-1].manual_seed(cfg.seed if cfg.seed is not None else 0)
    eos = set() if cfg.ignore_eos else eos
    outs: list[list[int]] = [[] for _ in range(batch)]
    seqs = list(range(batch))  # cache row i decodes sequence seqs[i]
    rows = torch.arange(batch, device=device)
    at = to_device(cache.lengths, torch.long, device)  # where each row's next K/V goes
    pos = to_device(positions, torch.long, device)
    steps = 0
    while True:
        if generators is None:
            tokens = logits.argmax(dim=-1).tolist()
        else:
            tokens = [int(sample_next(logits[i:i + 1], cfg.temperature, cfg.top_p, generators[s])[0])
                      for i, s in enumerate(seqs)]
        alive = []
        for i, (s, token) in enumerate(zip(seqs, tokens)):
            outs[s].append(token)
            if token not in eos and len(outs[s]) < cfg.max_new_tokens and not (stop and stop(s, outs[s])):
                alive.append(i)
        yield list(zip(seqs, tokens))
        if not alive:
            break
        if len(alive) < len(seqs):
            cache.keep_rows(alive)
            index = to_device(alive, torch.long, device)
            seqs, tokens = [seqs[i] for i in alive], [tokens[i] for i in alive]
            rows, at, pos = rows[:len(alive)], at[index], pos[index]
        if max(cache.lengths) >= cache.capacity:
            raise RuntimeError(f"KV cache overflow: {max(cache.lengths) + 1} > capacity {cache.capacity}")
        cache_lens = (at + 1).to(torch.int32)

        def attend(layer, q, k, v):
            cache.append_tokens(layer, rows, at, k, v)
            return decode_attention(q, cache.keys[layer], cache.values[layer], cache_lens,
                                    key_mask=cache.key_mask[layer], backend=backend)

        hidden = model(to_device(tokens, torch.long, device), pos, attend)
        cache.lengths = [n + 1 for n in cache.lengths]
        at += 1
        pos += 1
        steps += 1
        logits = model.lm_head_rows(hidden)
    for out in outs:
        if out and out[-1] in eos:
            out.pop()
    return outs, steps


def region_mask(cal, merged: int, m: int, device) -> torch.Tensor:
    """Which of the merged + m keys calibration may mask: merged-cache positions in the region, never the
    question's own tokens."""
    j = torch.arange(merged + m, device=device)
    n = cal.region_tokens
    in_cache = j < merged
    if cal.region == "sink":
        return in_cache & (j < n)
    if cal.region == "recent":
        return in_cache & (j >= merged - n)
    if cal.region == "middle":
        return in_cache & (j >= n) & (j < merged - n)
    return in_cache


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
