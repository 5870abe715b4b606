"""The training-free alternatives a user would try instead of ParallelComp, as modes of the same runner: the
same model, tokenizer, prompt, template, dtype and decoding; only how the prompt is attended differs.

    yarn, dynamic-ntk  full attention over the whole prompt, RoPE scaled for its length with transformers'
                       formulas (the factor: the question's length over the trained window)
    self-extend        full attention; keys farther than a neighbour window from the query attend at grouped
                       positions (floor(position / G)), so no distance exceeds the window (Jin et al. 2024)
    streaming          StreamingLLM: a few sink tokens plus a recent window, the prompt read in steps, keys at
                       their cache slots, so no position exceeds the window; memory bounded (Xiao et al. 2023)

The model runs with an identity rotary (`Transformer.forward(rotary=...)`): each mode's attention rotates q and
k itself, at whatever positions the mode gives them. Attention is torch's SDPA: these are the baselines, and
on the CPU SDPA's flash kernel is what a user of them gets.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from .answer import cut_at_stop, peak_memory_bytes, stop_check
from .errors import ParallelCompError
from .generation import sample_next
from .model import apply_rope, dynamic_ntk_base
from .stats import GenerationResult
from .transfer import to_device

ALTERNATIVE_MODES = ("yarn", "dynamic-ntk", "self-extend", "streaming")
QUERY_BLOCK = 1024  # self-extend: prefill queries per masked attention call (the mask is block x keys)


def answer(model, tokenizer, cfg, plan, eos: set[int]) -> GenerationResult:
    """Answer one planned question (mode in ALTERNATIVE_MODES): the whole prompt through the mode's attention,
    then decoding, greedy or sampled as `cfg` says."""
    st = plan.stats
    ids = list(plan.toks.prefix) + list(plan.toks.document) + list(plan.toks.suffix)
    window = cfg.window or model.args.max_position_embeddings
    attention = ATTENTIONS[cfg.mode](model, cfg, window, len(ids) + cfg.max_new_tokens)
    device = model.embed_tokens.weight.device
    t = time.perf_counter()
    logits = attention.forward(to_device(ids, torch.long, device))
    st.time_prefill_s = time.perf_counter() - t
    st.chunk_spans, st.kept_chunks = [[0, len(plan.toks.document)]], [0]
    st.kv_tokens_per_layer_before = len(ids)
    st.question_position = len(plan.toks.prefix) + len(plan.toks.document)

    t = time.perf_counter()
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed if cfg.seed is not None else 0)
    stop = stop_check(tokenizer, cfg.stop_strings)
    eos = set() if cfg.ignore_eos else eos
    out: list[int] = []
    while True:
        token = int(sample_next(logits, cfg.temperature, cfg.top_p, generator)[0])
        out.append(token)
        if token in eos or len(out) >= cfg.max_new_tokens or (stop and stop(0, out)):
            break
        logits = attention.forward(to_device([token], torch.long, device))
    if out and out[-1] in eos:
        out.pop()
    st.time_decode_s = time.perf_counter() - t
    st.new_tokens = len(out)
    st.decode_steps = max(len(out) - 1, 0)
    st.decode_ms_per_token = 1000 * st.time_decode_s / max(st.decode_steps, 1)
    st.kv_tokens_per_layer_after = attention.cached_tokens()
    st.kv_cache_bytes = attention.cache_bytes()
    st.time_total_s = time.perf_counter() - plan.t0
    st.peak_memory_bytes = peak_memory_bytes(device)
    text = cut_at_stop(tokenizer.decode(out, skip_special_tokens=True), cfg.stop_strings)
    st.empty_answer = not text.strip()
    return GenerationResult(text=text, token_ids=out, stats=st)


def attend_sdpa(q, k, v, causal: bool = False, mask=None, scale: float | None = None) -> torch.Tensor:
    """q [n, H, d], k/v [m, H_kv, d] -> [n, H, d] (GQA by head groups)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask, is_causal=causal,
                                         scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def attend_after(q, keys, values, start: int) -> torch.Tensor:
    """Causal attention of q's rows (positions start, start + 1, ...) over keys/values [0, start + n)."""
    n, end = q.shape[0], keys.shape[0]
    if start == 0:
        return attend_sdpa(q, keys, values, causal=True)
    if n == 1:
        return attend_sdpa(q, keys, values)
    i = torch.arange(start, end, device=q.device)[:, None]
    return attend_sdpa(q, keys, values, mask=torch.arange(end, device=q.device)[None] <= i)


class _Runner:
    """The model with an identity rotary and a K/V cache per layer; subclasses rotate and attend."""

    def __init__(self, model, capacity: int):
        self.model = model
        a = model.args
        weight = model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.keys = [torch.empty(capacity, a.num_kv_heads, a.head_dim, dtype=self.dtype, device=self.device)
                     for _ in range(a.num_layers)]
        self.values = [torch.empty_like(k) for k in self.keys]
        self.length = 0  # cached tokens (cache slots in use)
        self.tables = None  # what attend rotates with in this forward, made once for all layers

    def tables_for(self, positions: torch.Tensor):
        """The rotary tables a forward of tokens at `positions` needs (None: the mode keeps its own)."""
        return None

    def rope(self, positions: torch.Tensor, args=None):
        return self.model.rope(positions, self.dtype, args)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed `ids` after what is cached; returns the last token's logits [1, vocab]."""
        n = ids.numel()
        self.before(n)
        d = self.model.args.head_dim
        identity = (torch.ones(n, d, dtype=self.dtype, device=self.device),
                    torch.zeros(n, d, dtype=self.dtype, device=self.device))
        zeros = torch.zeros(n, dtype=torch.long, device=self.device)
        last = torch.tensor([n - 1], device=self.device)
        self.tables = self.tables_for(torch.arange(self.length, self.length + n, device=self.device))
        hidden = self.model(ids, zeros, self.attend, out_rows=last, rotary=identity)
        self.length += n
        return self.model.lm_head_rows(hidden)

    def before(self, n: int) -> None:
        """Called before `n` new tokens are fed (streaming evicts here)."""

    def cached_tokens(self) -> int:
        return self.length

    def cache_bytes(self) -> int:
        return sum(t[:self.length].numel() * t.element_size() for t in self.keys + self.values)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[layer][self.length:self.length + k.shape[0]] = k
        self.values[layer][self.length:self.length + v.shape[0]] = v


class RopeScaled(_Runner):
    """Full causal attention with RoPE scaled for the question's whole length (`capacity`): YaRN or dynamic
    NTK as transformers computes them, over the trained window; no scaling when the question fits it."""

    def __init__(self, model, cfg, window: int, capacity: int):
        super().__init__(model, capacity)
        a = model.args
        if a.rope_scaling is not None:
            raise ParallelCompError(f"mode {cfg.mode}: the checkpoint already scales its rope "
                                    f"({a.rope_scaling['rope_type']}); answer with its own (mode full)")
        factor = capacity / window
        self.args = a
        if factor > 1 and cfg.mode == "yarn":
            self.args = dataclasses.replace(a, rope_scaling={
                "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": window})
        elif factor > 1 and cfg.mode == "dynamic-ntk":
            # transformers' dynamic NTK at the question's whole length, computed once: every token of the
            # question rotates with the same base (transformers recomputes it as the sequence grows).
            base = dynamic_ntk_base(a.rope_theta, a.head_dim, factor, capacity, window)
            self.args = dataclasses.replace(a, rope_theta=base)

    def tables_for(self, positions):
        return self.rope(positions, self.args)

    def attend(self, layer, q, k, v):
        n = q.shape[0]
        cos, sin = self.tables
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.store(layer, k, v)
        end = self.length + n
        return attend_after(q, self.keys[layer][:end], self.values[layer][:end], self.length)


def self_extend_group(cfg, window: int, capacity: int) -> int:
    """G: the configured group, or the smallest whose grouped positions stay inside the window."""
    if cfg.self_extend_group is not None:
        return cfg.self_extend_group
    near = cfg.self_extend_window
    if capacity <= window:
        return 1
    # The farthest query's grouped position, (capacity - 1) // G + near - near // G, must stay below window.
    return max(1, math.floor((capacity - near) / (window - near)) + 1)


class SelfExtend(_Runner):
    """Keys within `near` positions of a query use their own positions; farther keys and the query use grouped
    ones: key j at j // G, query i at i // G + near - near // G (the two ranges meet at distance `near`). One
    masked attention over both kinds of keys: the query's two rotations side by side in 2d dimensions and
    each key's rotation in its half (zeros in the other), so one softmax covers both, exactly."""

    def __init__(self, model, cfg, window: int, capacity: int):
        super().__init__(model, capacity)
        self.near = cfg.self_extend_window
        if self.near >= window and capacity > window:
            raise ParallelCompError(f"self_extend_window {self.near}: must be below the {window}-token window")
        self.group = self_extend_group(cfg, window, capacity)
        far_end = (capacity - 1) // self.group + self.near - self.near // self.group
        if far_end >= window:
            raise ParallelCompError(f"self_extend_group {self.group}: grouped positions reach {far_end}, past the "
                                    f"{window}-token window; use a group of at least "
                                    f"{self_extend_group(dataclasses.replace(cfg, self_extend_group=None), window, capacity)}")
        self.grouped = [torch.empty_like(k) for k in self.keys]

    def cache_bytes(self) -> int:
        return super().cache_bytes() + sum(t[:self.length].numel() * t.element_size() for t in self.grouped)

    def tables_for(self, positions):
        g, near = self.group, self.near
        return self.rope(positions), self.rope(positions // g), self.rope(positions // g + near - near // g)

    def attend(self, layer, q, k, v):
        n, g = q.shape[0], self.group
        (cos, sin), (cos_g, sin_g), (cos_q, sin_q) = self.tables
        self.store(layer, apply_rope(k, cos, sin), v)
        q_near = apply_rope(q, cos, sin)
        if g == 1:  # every position is its own group: plain causal attention
            end = self.length + n
            return attend_after(q_near, self.keys[layer][:end], self.values[layer][:end], self.length)
        self.grouped[layer][self.length:self.length + n] = apply_rope(k, cos_g, sin_g)
        q_far = apply_rope(q, cos_q, sin_q)
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = torch.empty_like(q)
        for a in range(0, n, QUERY_BLOCK):
            b = min(a + QUERY_BLOCK, n)
            out[a:b] = self._block(layer, q_near[a:b], q_far[a:b], self.length + a, self.length + b, scale)
        return out

    def _block(self, layer, q_near, q_far, a: int, b: int, scale: float):
        """Queries at positions a..b-1: near keys (a - near, b), far keys [0, b - near). Keys before
        a - near + 1 are far for every query of the block: one unmasked flash call over them; the band
        [a - near + 1, b), where a key is far for some queries and near for others, is one masked call over
        both kinds of keys; the two are merged by their log-sum-exps."""
        near = self.near
        n0, f = max(0, a - near + 1), max(0, b - near)
        keys_near, values = self.keys[layer][n0:b], self.values[layer]
        i = torch.arange(a, b, device=self.device)[:, None]
        j_near = torch.arange(n0, b, device=self.device)[None]
        mask_near = (j_near <= i) & (j_near > i - near)
        if f == 0:
            return attend_sdpa(q_near, keys_near, values[n0:b], mask=mask_near, scale=scale)
        band_far = self.grouped[layer][n0:f]
        q2 = torch.cat([q_far, q_near], dim=-1)
        k2 = torch.cat([torch.cat([band_far, torch.zeros_like(band_far)], dim=-1),
                        torch.cat([torch.zeros_like(keys_near), keys_near], dim=-1)])
        v2 = torch.cat([values[n0:f], values[n0:b]])
        mask_far = torch.arange(n0, f, device=self.device)[None] <= i - near
        out, lse = _attend_with_lse(q2, k2, v2, torch.cat([mask_far, mask_near], dim=1), scale)
        if n0 > 0:
            out_far, lse_far = _attend_with_lse(q_far, self.grouped[layer][:n0], values[:n0], None, scale)
            top = torch.maximum(lse, lse_far)
            w, w_far = torch.exp(lse - top)[..., None], torch.exp(lse_far - top)[..., None]
            out = (out * w + out_far * w_far) / (w + w_far)
        return out.to(q_near.dtype)


def _attend_with_lse(q, k, v, mask, scale: float):
    """Softmax attention of q [n, H, d] over k [m, H_kv, d], v [m, H_kv, dv <= d] (GQA by head groups), and
    its log-sum-exp: (out [n, H, dv] float32, lse [n, H] float32); mask [n, m] (True: attend) or None. On a
    CPU the flash kernel, which returns the log-sum-exp (it wants v as wide as q: zero-padded); elsewhere
    explicit float32 scores."""
    n, heads, d = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    group = heads // kv_heads
    # a KV head's G query heads as G rows per query: no K/V repeated
    rows = q.reshape(n, kv_heads, group, d).permute(1, 0, 2, 3).reshape(1, kv_heads, n * group, d)
    keys = k.transpose(0, 1)[None]
    if mask is not None:
        mask = mask.repeat_interleave(group, dim=0)
    if q.device.type == "cpu":
        vals = v if dv == d else torch.cat([v, v.new_zeros(v.shape[0], kv_heads, d - dv)], dim=-1)
        if mask is not None:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            rows, keys, vals.transpose(0, 1)[None], 0.0, False, attn_mask=mask, scale=scale)[:2]
        out = out[..., :dv].float()
    else:  # explicit float32 scores (a baseline mode: plain torch on any device)
        scores = torch.matmul(rows.float(), keys.float().transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.exp(scores - lse[..., None]), v.transpose(0, 1)[None].float())
    out = out[0].reshape(kv_heads, n, group, dv).permute(1, 0, 2, 3).reshape(n, heads, dv)
    return out, lse[0].reshape(kv_heads, n, group).permute(1, 0, 2).reshape(n, heads)


class Streaming(_Runner):
    """StreamingLLM: the cache holds the first `sinks` tokens and a recent window, at most the trained window
    in all; each key is rotated at its current cache slot, so positions never pass the window. The prompt is
    read `stream_step` tokens per forward; before each, the oldest non-sink tokens are dropped to make room
    (room kept for the answer's tokens too). Keys are cached unrotated and rotated per forward (slots move
    as tokens are dropped)."""

    def __init__(self, model, cfg, window: int, capacity: int):
        self.limit = min(window, capacity)
        super().__init__(model, self.limit)
        self.sinks, self.step, self.reserve = cfg.sink_tokens, cfg.stream_step, cfg.max_new_tokens
        if capacity > window and self.sinks + self.step + self.reserve >= window:
            raise ParallelCompError(f"mode streaming: sink_tokens + stream_step + max_new_tokens "
                                    f"({self.sinks + self.step + self.reserve}) must be below the {window}-token "
                                    "window")
        self.cos, self.sin = self.rope(torch.arange(self.limit, device=self.device))
        self.evicted = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = None
        for a in range(0, ids.numel(), self.step):
            logits = super().forward(ids[a:a + self.step])
        return logits

    def before(self, n: int) -> None:
        # The prompt's steps leave room for the answer; decoding then fills that room.
        room = self.limit - n - (self.reserve if n > 1 else 0)
        drop = self.length - max(room, self.sinks)
        if drop <= 0:
            return
        keep_from = self.sinks + drop
        for t in self.keys + self.values:
            t[self.sinks:self.length - drop] = t[keep_from:self.length].clone()
        self.length -= drop
        self.evicted += drop

    def attend(self, layer, q, k, v):
        end = self.length + q.shape[0]
        self.store(layer, k, v)
        cos, sin = self.cos[:end], self.sin[:end]
        keys = apply_rope(self.keys[layer][:end], cos, sin)
        q = apply_rope(q, cos[self.length:end], sin[self.length:end])
        return attend_after(q, keys, self.values[layer][:end], self.length)


ATTENTIONS = {"yarn": RopeScaled, "dynamic-ntk": RopeScaled, "self-extend": SelfExtend, "streaming": Streaming}
