"""ParallelComp end to end: parallel chunk prefill with KV eviction, chunk eviction by question NLL,
merge, question pass (with optional attention-bias calibration) and decoding on the compressed cache."""
from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cache import ChunkCache, CompressedKVCache
from .config import ParallelCompConfig
from .errors import ParallelCompError
from .generation import sample_next
from .kernels.chunk_attention import chunk_attention
from .kernels.decode_attention import decode_attention
from .kernels.select_kv import gather_kv, select_kv
from .loading import load_model, parse_dtype, resolve_model_dir
from .prompt import PromptTokens, resolve_template, split_even, tokenize_prompt, truncate_middle

@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)
    # chunk index -> per layer [H_kv, n] kept chunk-local context positions (KV eviction only).
    kept_positions: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class ParallelComp:
    def __init__(self, model, tokenizer, source: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        # Whole documents are tokenized on purpose: silence the tokenizer's "longer than the model" warning.
        tokenizer.model_max_length = 1 << 62
        self.source = source
        self.args = model.args

    @classmethod
    def from_pretrained(cls, model_dir=None, dtype="float32", device="cpu", backend="auto") -> "ParallelComp":
        path = resolve_model_dir(model_dir)
        model, tokenizer = load_model(path, dtype=parse_dtype(dtype), device=device)
        model.backend = backend
        return cls(model, tokenizer, str(path))

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def backend(self) -> str:
        return self.model.backend

    def eos_ids(self) -> set[int]:
        ids = set(self.args.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(self, context: str, question: str, max_new_tokens: int | None = None,
                 config: ParallelCompConfig | None = None, progress: bool = False,
                 observer=None) -> GenerationResult:
        """Answer `question` about `context`. `observer`, if given, is called with what the attention does:
        ``observer.chunk_scores(layer, chunk, scores [context_len, H_kv], kept [H_kv, n] | None)`` for every
        chunk and layer, and ``observer.calibration(layer, scores [S + m, H], mask [S + m, H])`` in calibrated
        layers (see parallelcomp_triton.inspect)."""
        cfg = dataclasses.replace(config) if config is not None else ParallelCompConfig()
        if max_new_tokens is not None:
            cfg.max_new_tokens = max_new_tokens
        cfg.check()
        if cfg.calibration is not None:
            cfg.calibration.check(self.args.num_layers)
        if question is None or not question.strip():
            raise ParallelCompError("the question is empty")
        stats: dict = {"mode": cfg.mode}
        t0 = time.perf_counter()
        template = resolve_template(self.tokenizer, cfg.template, cfg.prompt)
        toks = tokenize_prompt(self.tokenizer, template, context, question)
        window = cfg.window or self.args.max_position_embeddings
        fixed = len(toks.prefix) + len(toks.suffix) + cfg.max_new_tokens
        if fixed >= window:
            raise ParallelCompError(f"prompt prefix + question ({len(toks.prefix) + len(toks.suffix)} tokens) "
                                    f"+ max_new_tokens ({cfg.max_new_tokens}) do not fit the {window}-token window")
        room = window - fixed
        stats["document_tokens"] = len(toks.document)
        stats["prefix_tokens"], stats["question_tokens"] = len(toks.prefix), len(toks.suffix)
        stats["time_tokenize_s"] = time.perf_counter() - t0

        if cfg.mode == "parallelcomp":
            chunk_tokens = cfg.chunk_tokens or room
            if chunk_tokens > room:
                raise ParallelCompError(f"chunk_tokens {chunk_tokens}: a chunk plus prompt and answer must fit the "
                                        f"{window}-token window (at most {room} here)")
            spans = split_even(len(toks.document), chunk_tokens)
            keep, budget, append_question = cfg.keep_chunks, cfg.kv_budget, True
        else:
            doc = toks.document if cfg.mode == "full" else truncate_middle(toks.document, room)
            toks = dataclasses.replace(toks, document=doc)
            spans = [(0, len(doc))]
            keep, budget, append_question = 1, None, False
        result = self._run(cfg, toks, spans, keep, budget, append_question, stats, progress, observer)
        stats["time_total_s"] = time.perf_counter() - t0
        stats["peak_memory_bytes"] = _peak_memory_bytes(self.device)
        return result

    # ------------------------------------------------------------------ stages
    def _run(self, cfg, toks: PromptTokens, spans, keep, budget, append_question, stats, progress, observer):
        t = time.perf_counter()
        prefix_kv, kept, alive_max = self._prefill(cfg, toks, spans, keep, budget, append_question, progress,
                                                   observer)
        stats["time_prefill_s"] = time.perf_counter() - t
        stats["chunk_spans"] = [list(s) for s in spans]
        stats["chunk_nll"] = [None] * len(spans)
        for c in kept:
            stats["chunk_nll"][c.index] = c.nll
        stats["chunk_nll_all"] = self._last_nll
        stats["kept_chunks"] = [c.index for c in kept]
        stats["max_alive_chunk_caches"] = alive_max
        stats["kv_tokens_per_layer_before"] = len(toks.prefix) + sum(e - s for s, e in spans)
        prefix_len = len(toks.prefix)
        cache = CompressedKVCache.merge(prefix_kv[0] if prefix_len else None, prefix_kv[1] if prefix_len else None,
                                        kept, self.args.num_heads, len(toks.suffix) + cfg.max_new_tokens)
        stats["kv_tokens_per_layer_after"] = cache.length
        stats["kv_cache_bytes"] = cache.nbytes()
        # The question sits right after the longest kept chunk in the shared position range.
        p0 = prefix_len + max(c.context_len for c in kept)
        stats["question_position"] = p0

        t = time.perf_counter()
        logits = self._question_pass(cfg, cache, toks.suffix, p0, stats, observer)
        stats["time_question_s"] = time.perf_counter() - t

        t = time.perf_counter()
        out_ids = self._decode(cfg, cache, logits, p0 + len(toks.suffix))
        dt = time.perf_counter() - t
        stats["time_decode_s"] = dt
        stats["new_tokens"] = len(out_ids)
        stats["decode_ms_per_token"] = 1000 * dt / max(1, len(out_ids) - 1) if len(out_ids) > 1 else 0.0
        text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
        positions = {c.index: c.positions for c in kept if c.positions is not None}
        return GenerationResult(text=text, token_ids=out_ids, stats=stats, kept_positions=positions)

    def _prefill(self, cfg, toks: PromptTokens, spans, keep, budget, append_question, progress, observer):
        """Encode chunks `batch_chunks` at a time, packed varlen; keep the `keep` best compressed caches.

        Returns ((prefix keys, prefix values) per layer, kept chunks in document order, the largest number
        of chunk caches alive at once)."""
        model, device, backend = self.model, self.device, self.backend
        prefix, suffix = toks.prefix, (toks.suffix if append_question else [])
        p_len, m = len(prefix), len(suffix)
        num_layers = self.args.num_layers
        prefix_k: list[torch.Tensor | None] = [None] * num_layers
        prefix_v: list[torch.Tensor | None] = [None] * num_layers
        kept: list[ChunkCache] = []
        alive_max = 0
        self._last_nll = [None] * len(spans)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(spans), desc="chunks", unit="chunk", leave=False)
        score_window = min(cfg.score_window, m) if ((budget is not None or observer is not None) and m) else 0
        for first in range(0, len(spans), cfg.batch_chunks):
            batch = list(range(first, min(first + cfg.batch_chunks, len(spans))))
            ids, pos, lens, ctx_rows, ctx_lens = [], [], [], [], []
            start = 0
            for c in batch:
                s, e = spans[c]
                seq = prefix + toks.document[s:e] + suffix
                ids.extend(seq)
                pos.extend(range(len(seq)))
                lens.append(len(seq))
                ctx_rows.append((start + p_len, start + p_len + (e - s)))
                ctx_lens.append(e - s)
                start += len(seq)
            ids_t = torch.tensor(ids, dtype=torch.long, device=device)
            pos_t = torch.tensor(pos, dtype=torch.long, device=device)
            cu = torch.tensor([0] + list(_cumsum(lens)), dtype=torch.int32, device=device)
            caches = [ChunkCache(index=c, context_len=ctx_lens[i], positions=[] if budget is not None else None)
                      for i, c in enumerate(batch)]
            # Context rows of every chunk, packed: what KV eviction chooses from (prefix and question excluded).
            ctx_index = torch.cat([torch.arange(a, b, device=device) for a, b in ctx_rows])
            ctx_cu = torch.tensor([0] + list(_cumsum(ctx_lens)), dtype=torch.int32, device=device)
            kept_lens = [min(budget, n) for n in ctx_lens] if budget is not None else ctx_lens

            def attend(layer, q, k, v):
                out, _, scores = chunk_attention(q, k, v, cu, cu, causal=True, score_window=score_window,
                                                 score_reduce=cfg.gqa_reduce, return_lse=False, backend=backend)
                if p_len and prefix_k[layer] is None:
                    # The prefix sees only itself: its KV is the same in every chunk, so one copy serves all.
                    prefix_k[layer] = k[:p_len].transpose(0, 1).contiguous()
                    prefix_v[layer] = v[:p_len].transpose(0, 1).contiguous()
                if budget is None:
                    for cache, (a, b) in zip(caches, ctx_rows):
                        cache.keys.append(k[a:b].transpose(0, 1).contiguous())
                        cache.values.append(v[a:b].transpose(0, 1).contiguous())
                        if observer is not None and scores is not None:
                            observer.chunk_scores(layer, cache.index, scores[a:b], None)
                    return out
                keep_idx, _ = select_kv(scores[ctx_index], ctx_cu, budget, pool_kernel=cfg.pool_kernel,
                                        backend=backend)
                k_c, v_c = gather_kv(k[ctx_index], v[ctx_index], ctx_cu, keep_idx, backend=backend)
                for i, cache in enumerate(caches):
                    n = kept_lens[i]
                    cache.keys.append(k_c[i, :, :n].contiguous())
                    cache.values.append(v_c[i, :, :n].contiguous())
                    cache.positions.append(keep_idx[i, :, :n])
                    if observer is not None:
                        a, b = ctx_rows[i]
                        observer.chunk_scores(layer, cache.index, scores[a:b], keep_idx[i, :, :n])
                return out

            hidden = model(ids_t, pos_t, attend)
            if append_question:
                # Question NLL given the chunk, from the few rows that predict the question tokens.
                rows = torch.cat([torch.arange(b - 1, b - 1 + m, device=device) for _, b in ctx_rows])
                logits = model.lm_head_rows(hidden[rows]).view(len(batch), m, -1)
                target = torch.tensor(suffix, device=device).expand(len(batch), m)
                nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(dim=1)
                for cache, value in zip(caches, nll.tolist()):
                    cache.nll = value
                    self._last_nll[cache.index] = value
            del hidden
            alive_max = max(alive_max, len(kept) + len(caches))
            # Chunk eviction: the K lowest NLL survive (ties: earlier chunk); the rest are freed now.
            kept = sorted(kept + caches, key=lambda c: (_nan_last(c.nll), c.index))[:keep]
            del caches
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        kept.sort(key=lambda c: c.index)
        return (prefix_k, prefix_v), kept, alive_max

    def _question_pass(self, cfg, cache: CompressedKVCache, suffix: list[int], p0: int, stats,
                       observer=None) -> torch.Tensor:
        """Re-encode the question over the merged cache; returns the last row's logits [1, vocab]."""
        model, device, backend = self.model, self.device, self.backend
        m, merged = len(suffix), cache.length
        ids = torch.tensor(suffix, dtype=torch.long, device=device)
        pos = torch.arange(p0, p0 + m, device=device)
        cu_q = torch.tensor([0, m], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, merged + m], dtype=torch.int32, device=device)
        cal = cfg.calibration
        masked_counts = {}

        def attend(layer, q, k, v):
            cache.append(layer, merged, k, v)
            k_all, v_all = cache.packed_view(layer, merged + m)
            key_mask = None
            if cal is not None and cal.first_layer <= layer <= cal.last_layer:
                rows = min(cal.rows, m)
                _, _, scores = chunk_attention(q, k_all, v_all, cu_q, cu_k, causal=True, score_window=rows,
                                               score_reduce="none", return_lse=False, backend=backend)
                key_mask = (scores / rows > cal.tau) & _region_mask(cal, merged, m, device)[:, None]
                cache.set_key_mask(layer, key_mask)
                masked_counts[layer] = key_mask.sum(dim=0).tolist()
                if observer is not None:
                    observer.calibration(layer, scores / rows, key_mask)
            out, _, _ = chunk_attention(q, k_all, v_all, cu_q, cu_k, causal=True, key_mask=key_mask,
                                        return_lse=False, backend=backend)
            return out

        hidden = model(ids, pos, attend)
        cache.length = merged + m
        if cal is not None:
            stats["calibration_masked_per_head"] = masked_counts
        return model.lm_head_rows(hidden[-1:])

    def _decode(self, cfg, cache: CompressedKVCache, logits: torch.Tensor, position: int) -> list[int]:
        model, device, backend = self.model, self.device, self.backend
        generator = None
        if cfg.temperature > 0:
            generator = torch.Generator(device=device)
            generator.manual_seed(cfg.seed if cfg.seed is not None else 0)
        eos = self.eos_ids()
        out: list[int] = []
        cache_lens = torch.zeros(1, dtype=torch.int32, device=device)
        while True:
            token = int(sample_next(logits, cfg.temperature, cfg.top_p, generator)[0])
            out.append(token)
            if token in eos or len(out) >= cfg.max_new_tokens:
                break
            at = cache.length
            cache_lens.fill_(at + 1)

            def attend(layer, q, k, v):
                cache.append(layer, at, k, v)
                return decode_attention(q, cache.keys[layer], cache.values[layer], cache_lens,
                                        key_mask=cache.key_mask[layer], backend=backend)

            hidden = model(torch.tensor([token], device=device), torch.tensor([position], device=device), attend)
            cache.length = at + 1
            position += 1
            logits = model.lm_head_rows(hidden)
        if out and out[-1] in eos:
            out = out[:-1]
        return out


def _region_mask(cal, merged: int, m: int, device) -> torch.Tensor:
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


def _cumsum(values):
    total = 0
    for v in values:
        total += v
        yield total


def _nan_last(x: float) -> float:
    return float("inf") if x != x else x
