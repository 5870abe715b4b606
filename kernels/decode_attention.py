"""Decode attention over a compressed (merged, per-KV-head) cache: one new query token per sequence,
split-K ("flash-decoding") with grouped-query heads sharing each K/V load.

    out = decode_attention(q, k_cache, v_cache, cache_lens, sm_scale=None, key_mask=None)

    q          [B, H, d]         one token per sequence
    k_cache    [B, H_kv, S, d]   S = allocated capacity; positions >= cache_lens[b] are ignored
    v_cache    [B, H_kv, S, d]
    cache_lens int32 [B]         values above S count as S
    key_mask   bool [B, H, S]    optional, True = key excluded for that query head
    out        [B, H, d]         q's dtype; a row that sees no key is zero (never NaN)

Triton design:
  stage 1, grid (B, H_kv, num_splits): a program takes the G = H / H_kv query heads of one KV head as the
    rows of a [BLOCK_H, d] tile (BLOCK_H = max(16, next_pow2(G)), padding rows masked) so every K/V tile
    is loaded once per group, runs an online softmax (exp2, log2(e) folded into the scale) over its
    split of the keys, and writes the normalised partial output and its log2-sum-exp to fp32 scratch.
    A split past cache_len, or one whose keys are all masked, writes lse = -inf.
  stage 2, grid (B, H): combines the partials weighted by exp2(lse_i - max lse). With one split stage 1
    writes the output itself and stage 2 is not launched.
  num_splits comes from shapes alone (no host sync): enough (sequence, KV head, split) programs to fill
    the GPU (two per SM), at least SPLIT_MIN_KEYS keys a split, at most MAX_SPLITS; a tuned table entry
    (kernels/tuning.py) may set it, with the key tile and warps.

Cost, for L = cache length, G = H / H_kv, elt = bytes per element, NS = num_splits:
  FLOPs: 4 * B * H * L * d (QK^T and PV, 2 each), plus the exp2 per (head, key).
  bytes: 2 * B * H_kv * L * d * elt (K and V, read once per group) + 2 * B * H * d * elt (q, out)
         + B * H * L (key_mask) + 2 * 4 * B * H * NS * (d + 1) (partials, written and read back).
"""
import math

import torch
import triton
import triton.language as tl

from parallelcomp_triton.errors import ParallelCompError
from parallelcomp_triton.kernels.dispatch import resolve_backend, triton_interpret_enabled
from parallelcomp_triton.kernels.tuning import DTYPE_NAMES, bucket, tuned

LOG2E = 1.4426950408889634
SPLIT_MIN_KEYS = 256
MAX_SPLITS = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _decode_split_kernel(
    Q, K, V, CacheLens, KeyMask, PartialOut, PartialLse,
    qk_scale, seq_capacity, split_size, num_splits,
    stride_q_b, stride_q_h,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_m_b, stride_m_h, stride_o_b, stride_o_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_KEY_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    cache_len = tl.minimum(tl.load(CacheLens + seq), seq_capacity)
    split_start = split * split_size
    split_end = tl.minimum(split_start + split_size, cache_len)

    row = tl.arange(0, BLOCK_H)
    row_ok = row < GROUP
    head = kv_head * GROUP + row
    dim = tl.arange(0, BLOCK_D)
    dim_ok = dim < HEAD_DIM
    key_offs = tl.arange(0, BLOCK_N)

    q = tl.load(Q + seq.to(tl.int64) * stride_q_b + head[:, None] * stride_q_h + dim[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter cannot do bf16 arithmetic
        q = q.to(tl.float32)
    k_base = K + seq.to(tl.int64) * stride_k_b + kv_head.to(tl.int64) * stride_k_h
    v_base = V + seq.to(tl.int64) * stride_v_b + kv_head.to(tl.int64) * stride_v_h
    mask_base = KeyMask + seq.to(tl.int64) * stride_m_b + head[:, None].to(tl.int64) * stride_m_h

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(split_start, split_end, BLOCK_N):
        key = start + key_offs
        key_ok = key < split_end
        kv_ok = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_base + key[:, None].to(tl.int64) * stride_k_s + dim[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + key[:, None].to(tl.int64) * stride_v_s + dim[None, :], mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = key_ok[None, :]
        if HAS_KEY_MASK:
            excluded = tl.load(mask_base + key[None, :], mask=row_ok[:, None] & key_ok[None, :], other=1)
            visible = visible & (excluded == 0)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead (-inf - -inf is NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if DIRECT:  # one split: the normalised output is final (PartialOut is `out`, strides of [B, H, d])
        out_ptrs = PartialOut + seq.to(tl.int64) * stride_o_b + head[:, None].to(tl.int64) * stride_o_h + dim[None, :]
        tl.store(out_ptrs, out.to(PartialOut.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        partial_row = (seq * num_heads + head).to(tl.int64) * num_splits + split
        tl.store(PartialOut + partial_row[:, None] * HEAD_DIM + dim[None, :], out,
                 mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(PartialLse + partial_row, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    PartialOut, PartialLse, Out,
    num_splits, stride_o_b, stride_o_h,
    HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    split = tl.arange(0, BLOCK_SPLITS)
    dim = tl.arange(0, BLOCK_D)
    dim_ok = dim < HEAD_DIM
    partial_row = (seq * num_heads + head).to(tl.int64) * num_splits + split

    lse = tl.load(PartialLse + partial_row, mask=split < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no key anywhere: all weights 0
    weight = tl.exp2(lse - lse_max)
    used = lse > float("-inf")
    part = tl.load(PartialOut + partial_row[:, None] * HEAD_DIM + dim[None, :], mask=used[:, None] & dim_ok[None, :],
                   other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(part * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + seq.to(tl.int64) * stride_o_b + head * stride_o_h + dim, out.to(Out.dtype.element_ty), mask=dim_ok)


def split_plan(capacity: int, block_n: int, num_splits: int | None, programs: int | None = None):
    """Keys per split (a multiple of block_n) and the number of splits, from shapes alone (no host sync).
    `programs`: the (sequence, KV head) programs one split gives and, where known, how many the GPU runs at
    once (`_target_programs`): splits are added only until the GPU is full, so a large batch, which fills it
    by itself, runs one split and no combine pass; at most one split per SPLIT_MIN_KEYS keys, MAX_SPLITS."""
    if num_splits is None:
        by_keys = min(MAX_SPLITS, max(1, math.ceil(capacity / SPLIT_MIN_KEYS)))
        if programs is None:
            num_splits = by_keys
        else:
            have, target = programs
            num_splits = max(1, min(by_keys, math.ceil(target / max(1, have))))
    split_size = max(block_n, triton.cdiv(triton.cdiv(max(capacity, 1), num_splits), block_n) * block_n)
    return split_size, max(1, triton.cdiv(capacity, split_size))


def _output(out, q):
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ParallelCompError(f"decode_attention out: expected {q.dtype} {tuple(q.shape)} with unit last stride")
    return out


def _target_programs(device) -> int | None:
    """Programs that fill the GPU: two per SM (None off CUDA: the interpreter splits by keys alone)."""
    if device.type != "cuda":
        return None
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention_triton(q, k_cache, v_cache, cache_lens, *, sm_scale=None, key_mask=None, out=None,
                            block_n=None, num_splits=None, config=None):
    """The Triton path. `config` (BLOCK_N, num_warps, num_stages, splits) overrides the tuned or default
    launch (the tuner); `block_n` / `num_splits` override single fields."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    interpret = triton_interpret_enabled()
    if config is None:
        entry = tuned(q.device, "decode_attention", capacity, dtype=DTYPE_NAMES.get(q.dtype), head_dim=head_dim,
                      group=group, batch=bucket(batch, hi=64))
        config = entry.get("config", {}) if entry is not None else {}
    block_n = block_n or config.get("BLOCK_N") or (128 if interpret else BLOCK_N)  # fewer loop trips interpreted
    target = _target_programs(q.device)
    split_size, num_splits = split_plan(capacity, block_n, num_splits if num_splits is not None else config.get("splits"),
                                         None if target is None else (batch * num_kv_heads, target))
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    out = _output(out, q)
    if out.numel() == 0:
        return out

    direct = num_splits == 1
    if direct:  # the split kernel writes `out` itself: no partials, no combine launch
        partial_out, partial_lse = out, out
    else:
        partial_out = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    if key_mask is not None:  # the kernel reads it as bytes with a unit key stride
        key_mask = (key_mask if key_mask.stride(-1) == 1 else key_mask.contiguous()).view(torch.uint8)
    mask_arg, mask_strides = (key_mask, key_mask.stride()[:2]) if key_mask is not None else (cache_lens, (0, 0))
    block_d = triton.next_power_of_2(head_dim)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, cache_lens, mask_arg, partial_out, partial_lse,
        sm_scale * LOG2E, capacity, split_size, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *mask_strides, out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d, HAS_KEY_MASK=key_mask is not None, UPCAST=interpret,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DIRECT=direct,
        num_warps=config.get("num_warps", NUM_WARPS), num_stages=config.get("num_stages", NUM_STAGES),
    )
    if not direct:
        _decode_combine_kernel[(batch, num_heads)](
            partial_out, partial_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
            num_warps=NUM_WARPS,
        )
    return out


def decode_attention_torch(q, k_cache, v_cache, cache_lens, *, sm_scale=None, key_mask=None, out=None):
    batch, num_heads, head_dim = q.shape
    num_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    out = _output(out, q)
    # Grouped matmul: the G query heads of a KV head share its K/V without repeat_kv.
    q_grouped = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.matmul(q_grouped, k_cache.float().transpose(-1, -2)) * sm_scale      # [B, H_kv, G, S]
    visible = torch.arange(capacity, device=q.device)[None, :] < cache_lens.to(q.device).long()[:, None]
    visible = visible[:, None, None, :]
    if key_mask is not None:
        visible = visible & ~key_mask.view(batch, num_kv_heads, group, capacity)
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max)  # rows with no visible key
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    result = torch.matmul(probs, v_cache.float()) / torch.where(denom > 0, denom, 1.0)
    out.copy_(result.view(batch, num_heads, head_dim))
    return out


def decode_attention_reference(q, k_cache, v_cache, cache_lens, *, sm_scale=None, key_mask=None):
    """Naive attention in q's dtype (pass float64 tensors for the oracle), K/V repeated per query head."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    k = k_cache.repeat_interleave(num_heads // num_kv_heads, dim=1)                   # [B, H, S, d]
    v = v_cache.repeat_interleave(num_heads // num_kv_heads, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q, k) * sm_scale
    visible = torch.arange(capacity, device=q.device)[None, None, :] < cache_lens.to(q.device).long()[:, None, None]
    if key_mask is not None:
        visible = visible & ~key_mask
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key
    return torch.einsum("bhs,bhsd->bhd", probs, v)


def _check_args(q, k_cache, v_cache, cache_lens, key_mask):
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ParallelCompError(f"decode_attention: expected q [B, H, d] and k/v caches [B, H_kv, S, d], got "
                                f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, num_heads, head_dim = q.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ParallelCompError(f"decode_attention: cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)}")
    if num_heads % k_cache.shape[1] != 0:
        raise ParallelCompError(f"decode_attention: {num_heads} query heads are not a multiple of "
                                f"{k_cache.shape[1]} KV heads")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ParallelCompError("decode_attention: q, k_cache and v_cache must share one dtype")
    if cache_lens.shape != (batch,) or cache_lens.dtype != torch.int32 or cache_lens.device != q.device:
        raise ParallelCompError(f"decode_attention cache_lens: expected int32 [{batch}] on q's device")
    if key_mask is not None and (key_mask.shape != (batch, num_heads, k_cache.shape[2])
                                 or key_mask.dtype != torch.bool):
        raise ParallelCompError(f"decode_attention key_mask: expected bool [{batch}, {num_heads}, "
                                f"{k_cache.shape[2]}], got {key_mask.dtype} {tuple(key_mask.shape)}")


def decode_attention_sdpa(q, k_cache, v_cache, cache_lens, *, sm_scale=None, key_mask=None, out=None):
    """torch's SDPA with the cache lengths (and key_mask) as a boolean mask: the dispatch takes it on a GPU
    whose tuning table says it beats the tuned kernel for this shape class."""
    capacity = k_cache.shape[2]
    visible = (torch.arange(capacity, device=q.device)[None, :] < cache_lens.long()[:, None])[:, None, None, :]
    if key_mask is not None:
        visible = visible & ~key_mask[:, :, None, :]
    result = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=visible,
                                                              scale=sm_scale, enable_gqa=True)[:, :, 0]
    out = _output(out, q)
    return out.copy_(torch.nan_to_num(result, nan=0.0))  # a row that sees no key is 0, as in the kernel


def decode_path(backend, q, k_cache) -> str:
    """"triton", "torch" or "sdpa": the backend's choice, except SDPA on a GPU whose tuning table says it wins
    at this shape class."""
    path = resolve_backend(backend, q.device)
    if path == "triton" and q.device.type == "cuda":
        entry = tuned(q.device, "decode_attention", k_cache.shape[2], dtype=DTYPE_NAMES.get(q.dtype),
                      head_dim=q.shape[2], group=q.shape[1] // k_cache.shape[1], batch=bucket(q.shape[0], hi=64))
        if entry is not None and entry.get("use") == "sdpa":
            return "sdpa"
    return path


def decode_attention(q, k_cache, v_cache, cache_lens, *, sm_scale=None, key_mask=None, out=None, backend=None):
    """Softmax attention of one query token per sequence over its first cache_lens[b] cached keys."""
    _check_args(q, k_cache, v_cache, cache_lens, key_mask)
    path = decode_path(backend, q, k_cache)
    kwargs = dict(sm_scale=sm_scale, key_mask=key_mask, out=out)
    if path == "sdpa":
        return decode_attention_sdpa(q, k_cache, v_cache, cache_lens, **kwargs)
    if path == "triton":
        return decode_attention_triton(q, k_cache, v_cache, cache_lens, **kwargs)
    return decode_attention_torch(q, k_cache, v_cache, cache_lens, **kwargs)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (kernels.report)
# --------------------------------------------------------------------------------------------------


def aot_specs(dtype: str, head_dim: int) -> list[dict]:
    """The GPU specialisations the runner launches (GQA groups 4 and 8, with and without key_mask), for
    kernels.report (dtype: "bf16", "fp16", "fp32")."""
    from parallelcomp_triton.kernels.report import aligned_attrs

    block_d = triton.next_power_of_2(head_dim)
    split_signature = {
        "Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "CacheLens": "*i32", "KeyMask": "*u8",
        "PartialOut": "*fp32", "PartialLse": "*fp32",
        "qk_scale": "fp32", "seq_capacity": "i32", "split_size": "i32", "num_splits": "i32",
        "stride_q_b": "i32", "stride_q_h": "i32",
        "stride_k_b": "i32", "stride_k_h": "i32", "stride_k_s": "i32",
        "stride_v_b": "i32", "stride_v_h": "i32", "stride_v_s": "i32",
        "stride_m_b": "i32", "stride_m_h": "i32", "stride_o_b": "i32", "stride_o_h": "i32",
        "GROUP": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_H": "constexpr", "BLOCK_N": "constexpr",
        "BLOCK_D": "constexpr", "HAS_KEY_MASK": "constexpr", "UPCAST": "constexpr", "DOT_PRECISION": "constexpr",
        "DIRECT": "constexpr",
    }
    aligned = ["Q", "K", "V", "CacheLens", "KeyMask", "PartialOut", "PartialLse", "stride_q_b", "stride_q_h",
               "stride_k_b", "stride_k_h", "stride_k_s", "stride_v_b", "stride_v_h", "stride_v_s"]
    specs = []
    for group, has_mask, direct in ((4, False, False), (4, True, False), (8, False, False), (8, True, False),
                                    (4, False, True), (8, False, True)):
        signature = dict(split_signature, PartialOut=f"*{dtype}") if direct else split_signature
        specs.append({
            "kernel": f"decode_attention_split_g{group}{'_keymask' if has_mask else ''}{'_direct' if direct else ''}",
            "fn": _decode_split_kernel,
            "signature": signature,
            "constexprs": {"GROUP": group, "HEAD_DIM": head_dim, "BLOCK_H": max(16, triton.next_power_of_2(group)),
                           "BLOCK_N": BLOCK_N, "BLOCK_D": block_d, "HAS_KEY_MASK": has_mask, "UPCAST": False,
                           "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "DIRECT": direct},
            "num_warps": NUM_WARPS,
            "num_stages": NUM_STAGES,
            "attrs": aligned_attrs(_decode_split_kernel, aligned),
        })
    specs.append({
        "kernel": "decode_attention_combine",
        "fn": _decode_combine_kernel,
        "signature": {"PartialOut": "*fp32", "PartialLse": "*fp32", "Out": f"*{dtype}", "num_splits": "i32",
                      "stride_o_b": "i32", "stride_o_h": "i32",
                      "HEAD_DIM": "constexpr", "BLOCK_SPLITS": "constexpr", "BLOCK_D": "constexpr"},
        "constexprs": {"HEAD_DIM": head_dim, "BLOCK_SPLITS": MAX_SPLITS, "BLOCK_D": block_d},
        "num_warps": NUM_WARPS,
        "num_stages": 1,
        "attrs": aligned_attrs(_decode_combine_kernel, ["PartialOut", "PartialLse", "Out", "stride_o_b", "stride_o_h"]),
    })
    return specs
