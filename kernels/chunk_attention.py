"""Varlen chunk attention with fused observation-window scores (the ParallelComp prefill op).

Each packed sequence b (one document chunk, or the question over the merged cache) has Lq_b queries
and Lk_b keys; query heads H, KV heads H_kv (G = H / H_kv query heads per KV head), head dim d.
Causal masking is bottom-right aligned: query i sees keys j <= Lk_b - Lq_b + i.

    out[i, h]      = sum_j softmax_j(q_i . k_j * sm_scale) v_j          (0 for a row with no visible key)
    lse[i, h]      = log sum_j exp(q_i . k_j * sm_scale)                (natural log, -inf for such rows)
    scores[j, h]   = sum over the last w_b = min(w, Lq_b) rows i of p[i, j]   (SnapKV window scores)
    scores[j, kvh] = reduce("sum" | "mean" | "max") of scores[j, h] over the G heads of KV head kvh

Cost, with V_b = sum_i |visible keys of row i| (Lq_b*Lk_b non-causal, about Lq_b*(Lk_b - Lq_b/2) causal)
and s = bytes per element of q/k/v:
    FLOPs: attention 4 * sum_b V_b * H * d  (2 for QK^T, 2 for PV)
           + window scores 4 * sum_b w_b * Lk_b * H * d  (QK^T recomputed for the window rows in
             two sweeps: row statistics, then normalised column sums), plus ~5 exp/mul per score element.
    Bytes (compulsory): s * (total_q * H * d + 2 * total_k * H_kv * d)   read q, k, v
                      + s * total_q * H * d + 4 * total_q * H           write out, lse
                      + 4 * total_k * H * ceil(w / W_BLOCK)             write per-head window scores
                      + total_k * H                                     read key_mask (if given)
    The Triton kernel re-reads each sequence's K/V once per query tile and per query head
    (ceil(Lq_b / BLOCK_M) * H times, mostly served from L2), and twice more per head for the window.

Triton design: one launch, grid (NUM_WINDOW_PROGRAMS + cdiv(max Lq_b, BLOCK_M), B, H).
  * Programs [NUM_WINDOW_PROGRAMS, ...) are FlashAttention-2 forward tiles of BLOCK_M query rows of one
    (sequence, query head): online softmax in the exp2 domain with sm_scale*log2(e) folded into one
    multiply-add per score (exp2(s * scale - m)); key tiles entirely visible to every row of the tile run
    without masks or the empty-row guard, the rest (causal diagonal, ragged tail, key_mask) with them.
    Query tiles are launched last-first: under the causal mask they see the most keys. Tiles past a
    sequence's Lq exit at once.
  * Programs [0, NUM_WINDOW_PROGRAMS) each own W_BLOCK rows of the sequence's last w query rows: they
    sweep the keys once for the exact row statistics (m, l), then again writing
    sum_rows exp2(s - m) / l per key into their own slice of a [NUM_WINDOW_PROGRAMS, total_k, H]
    fp32 buffer. No atomics: results are deterministic. Rows outside the window cost nothing extra.
  * The slices are summed and reduced over each GQA group by a cheap torch op on [total_k, H] fp32.
"""
import math

import torch
import triton
import triton.language as tl

from parallelcomp_triton.kernels.dispatch import resolve_backend, triton_interpret_enabled
from parallelcomp_triton.kernels.tuning import tuned

SCORE_REDUCTIONS = ("sum", "mean", "max", "none")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LN2_CONSTEXPR = tl.constexpr(LN2)  # kernels may only read constexpr globals

# Window rows per window program: tl.dot needs M >= 16 on tensor cores; w = 8 (the default window)
# takes one program, w = 64 takes four programs running in parallel.
W_BLOCK = 16

# The torch path keeps each explicit [heads, rows, keys] block below this many elements.
_TORCH_BLOCK_ELEMENTS = 1 << 24

# Buffers every kernel must fully overwrite are allocated here, so tests can poison them.
_new_buffer = torch.empty


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _key_ranges(first_row, end_row, seq_len_q, seq_len_k, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range [0, hi) any of rows [first_row, end_row) sees, and [0, full_end) (whole BLOCK_N tiles)
    that every one of those rows sees, so that part needs no mask."""
    if CAUSAL:
        causal_offset = seq_len_k - seq_len_q
        hi = tl.minimum(tl.maximum(causal_offset + end_row, 0), seq_len_k)
        full_end = tl.minimum(tl.maximum(causal_offset + first_row + 1, 0), seq_len_k)
    else:
        hi = seq_len_k
        full_end = seq_len_k
    full_end = (full_end // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def _scaled_scores(q, K, KeyMask, start_n, rows, seq_len_q, seq_len_k, qk_scale,
                   stride_kt, stride_kd, stride_mt,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_KEY_MASK: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """s = q . k^T for one key tile (unscaled: callers fold sm_scale * log2(e) into the exponent's
    multiply-add), -inf where a key is invisible.

    K and KeyMask already point at this sequence's first key and this head. MASKED=False: the whole
    tile lies inside the sequence and is causally visible to every row (only key_mask can hide keys)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = K + offs_n.to(tl.int64)[None, :] * stride_kt + offs_d[:, None] * stride_kd
    if MASKED:
        k = tl.load(k_ptrs, mask=offs_n[None, :] < seq_len_k, other=0.0)
    else:
        k = tl.load(k_ptrs)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, k, input_precision=DOT_PRECISION)
    if MASKED:
        visible = offs_n[None, :] < seq_len_k
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= rows[:, None] + (seq_len_k - seq_len_q))
        s = tl.where(visible, s, float("-inf"))
    if HAS_KEY_MASK:
        km_ptrs = KeyMask + offs_n.to(tl.int64) * stride_mt
        if MASKED:
            excluded = tl.load(km_ptrs, mask=offs_n < seq_len_k, other=1)
        else:
            excluded = tl.load(km_ptrs)
        s = tl.where(excluded[None, :] != 0, float("-inf"), s)
    return s


@triton.jit
def _online_softmax_sweep(acc, m_i, l_i, q, K, V, KeyMask, lo, hi, rows, seq_len_q, seq_len_k, qk_scale,
                          stride_kt, stride_kd, stride_vt, stride_vd, stride_mt,
                          HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                          HAS_KEY_MASK: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, WITH_V: tl.constexpr):
    """FlashAttention-2 inner loop over key tiles [lo, hi); WITH_V=False only tracks (m, l)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        s = _scaled_scores(q, K, KeyMask, start_n, rows, seq_len_q, seq_len_k, qk_scale,
                           stride_kt, stride_kd, stride_mt,
                           HEAD_DIM, BLOCK_N, CAUSAL, HAS_KEY_MASK, MASKED, UPCAST, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale > 0: the max commutes with it
        if MASKED or HAS_KEY_MASK:
            # A row that has seen no visible key yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every row sees every key of an unmasked tile: m is finite, no guard needed
            m_safe = m_new
        p = tl.math.exp2(s * qk_scale - m_safe[:, None])  # one multiply-add per score
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if WITH_V:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            v_ptrs = V + offs_n.to(tl.int64)[:, None] * stride_vt + offs_d[None, :] * stride_vd
            if MASKED:
                v = tl.load(v_ptrs, mask=offs_n[:, None] < seq_len_k, other=0.0)
            else:
                v = tl.load(v_ptrs)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_tile(Q, K, V, Out, Lse, KeyMask, q_start, seq_len_q, seq_len_k, tile_m, qk_scale,
                    stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd,
                    stride_ot, stride_lt, stride_mt,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    start_m = tile_m * BLOCK_M
    if start_m < seq_len_q:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_in = offs_m < seq_len_q
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(Q + q_rows[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_in[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        full_end, hi = _key_ranges(start_m, tl.minimum(start_m + BLOCK_M, seq_len_q), seq_len_q, seq_len_k,
                                   CAUSAL, BLOCK_N)
        acc, m_i, l_i = _online_softmax_sweep(acc, m_i, l_i, q, K, V, KeyMask, 0, full_end, offs_m,
                                              seq_len_q, seq_len_k, qk_scale,
                                              stride_kt, stride_kd, stride_vt, stride_vd, stride_mt,
                                              HEAD_DIM, BLOCK_N, CAUSAL, HAS_KEY_MASK, False, UPCAST, DOT_PRECISION, True)
        acc, m_i, l_i = _online_softmax_sweep(acc, m_i, l_i, q, K, V, KeyMask, full_end, hi, offs_m,
                                              seq_len_q, seq_len_k, qk_scale,
                                              stride_kt, stride_kd, stride_vt, stride_vd, stride_mt,
                                              HEAD_DIM, BLOCK_N, CAUSAL, HAS_KEY_MASK, True, UPCAST, DOT_PRECISION, True)

        # Rows with no visible key: l = 0 -> out 0, lse -inf (never 0/0).
        has_keys = l_i > 0.0
        l_safe = tl.where(has_keys, l_i, 1.0)
        out = acc / l_safe[:, None]
        out_ptrs = Out + q_rows[:, None] * stride_ot + offs_d[None, :]
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_in[:, None])
        lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * _LN2_CONSTEXPR, float("-inf"))
        tl.store(Lse + q_rows * stride_lt, lse, mask=row_in)


@triton.jit
def _window_scores(Q, K, KeyMask, Scores, q_start, seq_len_q, seq_len_k, window_program,
                   score_window, qk_scale, stride_qt, stride_qd, stride_kt, stride_kd, stride_mt,
                   stride_sw, stride_st,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, W_BLOCK: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Column sums of the exact softmax over window rows [Lq - w_b + window_program*W_BLOCK, +W_BLOCK)."""
    window_rows = tl.minimum(score_window, seq_len_q)
    rows_here = tl.maximum(tl.minimum(window_rows - window_program * W_BLOCK, W_BLOCK), 0)
    first_row = seq_len_q - window_rows + window_program * W_BLOCK
    offs_w = tl.arange(0, W_BLOCK)
    rows = first_row + offs_w
    row_valid = offs_w < rows_here
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_valid[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Sweep 1: exact row statistics (m, l) of the window rows.
    m_i = tl.full([W_BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([W_BLOCK], dtype=tl.float32)
    full_end, hi = _key_ranges(first_row, first_row + rows_here, seq_len_q, seq_len_k, CAUSAL, BLOCK_N)
    hi = tl.where(rows_here > 0, hi, 0)
    full_end = tl.minimum(full_end, hi)
    unused = tl.zeros([W_BLOCK, HEAD_DIM], dtype=tl.float32)
    unused, m_i, l_i = _online_softmax_sweep(unused, m_i, l_i, q, K, K, KeyMask, 0, full_end, rows,
                                             seq_len_q, seq_len_k, qk_scale,
                                             stride_kt, stride_kd, stride_kt, stride_kd, stride_mt,
                                             HEAD_DIM, BLOCK_N, CAUSAL, HAS_KEY_MASK, False, UPCAST, DOT_PRECISION, False)
    unused, m_i, l_i = _online_softmax_sweep(unused, m_i, l_i, q, K, K, KeyMask, full_end, hi, rows,
                                             seq_len_q, seq_len_k, qk_scale,
                                             stride_kt, stride_kd, stride_kt, stride_kd, stride_mt,
                                             HEAD_DIM, BLOCK_N, CAUSAL, HAS_KEY_MASK, True, UPCAST, DOT_PRECISION, False)

    # Sweep 2: p = exp2(s - m) / l summed over the window rows, written for every key of the
    # sequence (keys no window row sees get 0). Rows outside the window loaded q = 0, so their s is
    # 0 (or -inf) and exp2(s - 0) * 0 = 0; a window row with no visible key has s = -inf everywhere.
    row_ok = row_valid & (l_i > 0.0)
    m_safe = tl.where(row_ok, m_i, 0.0)
    inv_l = tl.where(row_ok, 1.0 / tl.where(row_ok, l_i, 1.0), 0.0)
    score_ptrs = Scores + window_program * stride_sw
    for start_n in range(0, full_end, BLOCK_N):
        s = _scaled_scores(q, K, KeyMask, start_n, rows, seq_len_q, seq_len_k, qk_scale,
                           stride_kt, stride_kd, stride_mt,
                           HEAD_DIM, BLOCK_N, CAUSAL, HAS_KEY_MASK, False, UPCAST, DOT_PRECISION)
        p = tl.math.exp2(s * qk_scale - m_safe[:, None]) * inv_l[:, None]
        offs_n = start_n + tl.arange(0, BLOCK_N)
        tl.store(score_ptrs + offs_n.to(tl.int64) * stride_st, tl.sum(p, 0))
    for start_n in range(full_end, seq_len_k, BLOCK_N):
        s = _scaled_scores(q, K, KeyMask, start_n, rows, seq_len_q, seq_len_k, qk_scale,
                           stride_kt, stride_kd, stride_mt,
                           HEAD_DIM, BLOCK_N, CAUSAL, HAS_KEY_MASK, True, UPCAST, DOT_PRECISION)
        p = tl.math.exp2(s * qk_scale - m_safe[:, None]) * inv_l[:, None]
        offs_n = start_n + tl.arange(0, BLOCK_N)
        tl.store(score_ptrs + offs_n.to(tl.int64) * stride_st, tl.sum(p, 0), mask=offs_n < seq_len_k)


@triton.jit
def _chunk_attention_fwd_kernel(
    Q, K, V, Out, Lse, Scores, KeyMask, cu_seqlens_q, cu_seqlens_k,
    qk_scale, group_size, score_window, num_window_programs,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_lt,
    stride_sw, stride_st,
    stride_mt, stride_mh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // group_size
    q_start = tl.load(cu_seqlens_q + seq)
    seq_len_q = tl.load(cu_seqlens_q + seq + 1) - q_start
    k_start = tl.load(cu_seqlens_k + seq)
    seq_len_k = tl.load(cu_seqlens_k + seq + 1) - k_start

    # Point K/V/KeyMask at this sequence and head once; per-tile offsets stay small.
    Q = Q + head.to(tl.int64) * stride_qh
    K = K + k_start.to(tl.int64) * stride_kt + kv_head.to(tl.int64) * stride_kh
    V = V + k_start.to(tl.int64) * stride_vt + kv_head.to(tl.int64) * stride_vh
    if HAS_KEY_MASK:
        KeyMask = KeyMask + k_start.to(tl.int64) * stride_mt + head.to(tl.int64) * stride_mh

    if pid < num_window_programs:
        Scores = Scores + k_start.to(tl.int64) * stride_st + head
        _window_scores(Q, K, KeyMask, Scores, q_start, seq_len_q, seq_len_k, pid,
                       score_window, qk_scale, stride_qt, stride_qd, stride_kt, stride_kd, stride_mt,
                       stride_sw, stride_st,
                       HEAD_DIM, BLOCK_N, W_BLOCK, CAUSAL, HAS_KEY_MASK, UPCAST, DOT_PRECISION)
    else:
        Out = Out + head.to(tl.int64) * stride_oh
        Lse = Lse + head
        # The last query tiles see the most keys under the causal mask: launch them first, so the longest
        # programs do not start last and leave the GPU idle at the tail.
        tile_m = tl.num_programs(0) - 1 - pid
        _attention_tile(Q, K, V, Out, Lse, KeyMask, q_start, seq_len_q, seq_len_k, tile_m,
                        qk_scale,
                        stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd,
                        stride_ot, stride_lt, stride_mt,
                        HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, HAS_KEY_MASK, UPCAST, DOT_PRECISION)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: 3xTF32 on tensor cores (about fp32 accuracy; "ieee" falls back to FMA dots that
    spill heavily). fp16/bf16 ignore the setting. The interpreter always computes dots in full fp32."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _launch_config(dtype: torch.dtype, head_dim: int, tuned_entry: dict | None = None) -> dict:
    """The tuned tiles for this GPU and shape class where `kernels/tuned/<arch>.json` has them (measured by
    benchmarks/tune_gpu.py). Otherwise tiles that fit sm_80 (163 KB shared) and sm_90 (227 KB) at num_warps
    4: fp16/bf16 at d <= 128 compile with no register spills on either (ptxas -v on the aot_specs kernels;
    64x64 at d=128 spills on sm_80); fp32 (3xTF32 dots, not the model path) still spills."""
    if tuned_entry is not None and isinstance(tuned_entry.get("config"), dict):
        c = tuned_entry["config"]
        return {"BLOCK_M": int(c["BLOCK_M"]), "BLOCK_N": int(c["BLOCK_N"]), "W_BLOCK": W_BLOCK,
                "num_warps": int(c.get("num_warps", 4)), "num_stages": int(c.get("num_stages", 2))}
    if dtype == torch.float32:
        block_m, block_n, num_stages = (64, 32, 2) if head_dim <= 64 else (32, 32, 2)
    elif head_dim <= 64:
        block_m, block_n, num_stages = 64, 64, 2
    elif head_dim <= 128:
        block_m, block_n, num_stages = 64, 32, 3
    else:
        block_m, block_n, num_stages = 64, 32, 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "W_BLOCK": W_BLOCK, "num_warps": 4, "num_stages": num_stages}


def aot_specs(dtype: str, head_dim: int) -> list[dict]:
    """The kernel specialisations the package launches for a dtype ("bf16", "fp16", "fp32") and head
    dim, as arguments for triton.compile(ASTSource(fn, signature, constexprs, attrs), target, options).

    They mirror what Triton's JIT builds for contiguous [tokens, heads, d] inputs: head-dim strides
    equal to 1 become constexprs, aligned pointers and strides get divisibility-16 `attrs` (pass them:
    without them the compiler cannot vectorise loads and register use explodes)."""
    torch_dtype = {name: dt for dt, name in _TRITON_DTYPE_NAMES.items()}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"aot_specs: dtype {dtype!r} is not one of {', '.join(_TRITON_DTYPE_NAMES.values())}")
    _check_head_dim_for_triton(head_dim)
    cfg = _launch_config(torch_dtype, head_dim)
    arg_names = _chunk_attention_fwd_kernel.arg_names
    specs = []
    for causal in (True, False):
        for has_key_mask in (False, True):
            signature = {
                "Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Out": f"*{dtype}",
                "Lse": "*fp32", "Scores": "*fp32", "KeyMask": "*u8",
                "cu_seqlens_q": "*i32", "cu_seqlens_k": "*i32",
                "qk_scale": "fp32", "group_size": "i32", "score_window": "i32", "num_window_programs": "i32",
                "stride_qt": "i32", "stride_qh": "i32", "stride_qd": "constexpr",
                "stride_kt": "i32", "stride_kh": "i32", "stride_kd": "constexpr",
                "stride_vt": "i32", "stride_vh": "i32", "stride_vd": "constexpr",
                "stride_ot": "i32", "stride_oh": "i32", "stride_lt": "i32",
                "stride_sw": "i32", "stride_st": "i32",
                "stride_mt": "i32", "stride_mh": "i32",
                "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "W_BLOCK": "constexpr",
                "CAUSAL": "constexpr", "HAS_KEY_MASK": "constexpr", "UPCAST": "constexpr",
                "DOT_PRECISION": "constexpr",
            }
            constexprs = {
                "stride_qd": 1, "stride_kd": 1, "stride_vd": 1,
                "HEAD_DIM": head_dim, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "W_BLOCK": cfg["W_BLOCK"],
                "CAUSAL": causal, "HAS_KEY_MASK": has_key_mask, "UPCAST": False,
                "DOT_PRECISION": _dot_precision(torch_dtype),
            }
            if has_key_mask:  # the wrapper passes the mask head-major: unit key stride
                signature["stride_mt"] = "constexpr"
                constexprs["stride_mt"] = 1
            # Triton's JIT marks 16-byte aligned pointers and multiple-of-16 ints (here: token and head
            # strides of contiguous [tokens, heads, d] tensors); without these hints loads are not
            # vectorised and the compiled kernel is not the one that runs.
            aligned = ("Q", "K", "V", "Out", "Lse", "Scores", "KeyMask", "cu_seqlens_q", "cu_seqlens_k",
                       "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                       "stride_ot", "stride_oh")
            attrs = {(arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
            name = f"chunk_attention_fwd_{dtype}_d{head_dim}_{'causal' if causal else 'full'}"
            if has_key_mask:
                name += "_keymask"
            specs.append({"kernel": name, "fn": _chunk_attention_fwd_kernel, "signature": signature,
                          "constexprs": constexprs, "attrs": attrs, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    return specs


# --------------------------------------------------------------------------------------------------
# Argument checks (shared by every path)
# --------------------------------------------------------------------------------------------------


def _check_head_dim_for_triton(head_dim: int) -> None:
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"chunk_attention: the Triton kernel needs a power-of-2 head dim in [16, 256], got {head_dim}")


def _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, score_window, score_reduce, key_mask, *, need_float=True,
                bounds_q=None, bounds_k=None):
    """Validate and return (bounds_q, bounds_k, group): host lists of sequence starts, and H // H_kv.
    `bounds_q` / `bounds_k`: the caller's host copies of cu_seqlens_q / cu_seqlens_k, which spare reading
    the device tensors back (on a GPU that read waits for all queued work)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"chunk_attention: {name} must be a 3-D tensor [tokens, heads, head_dim], "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if need_float and q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"chunk_attention: dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"chunk_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"chunk_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    total_q, num_heads, head_dim = q.shape
    total_k, num_kv_heads, _ = k.shape
    if k.shape[2] != head_dim or v.shape[2] != head_dim:
        raise ValueError(f"chunk_attention: head dims differ: q {head_dim}, k {k.shape[2]}, v {v.shape[2]}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"chunk_attention: k {tuple(k.shape)} and v {tuple(v.shape)} shapes differ")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"chunk_attention: query heads {num_heads} is not a multiple of KV heads {num_kv_heads}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"chunk_attention: {name} must be a 1-D int32 tensor [B+1]")
        if cu.device != q.device:
            raise ValueError(f"chunk_attention: {name} is on {cu.device}, q on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"chunk_attention: cu_seqlens_q has {cu_seqlens_q.numel()} entries, "
                         f"cu_seqlens_k {cu_seqlens_k.numel()}")
    bounds_q = [int(x) for x in bounds_q] if bounds_q is not None else cu_seqlens_q.tolist()
    bounds_k = [int(x) for x in bounds_k] if bounds_k is not None else cu_seqlens_k.tolist()
    if len(bounds_q) != cu_seqlens_q.numel() or len(bounds_k) != cu_seqlens_k.numel():
        raise ValueError("chunk_attention: bounds_q / bounds_k must have as many entries as cu_seqlens_q / _k")
    for name, bounds, total in (("cu_seqlens_q", bounds_q, total_q), ("cu_seqlens_k", bounds_k, total_k)):
        if bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            shown = ", ".join(map(str, bounds[:8])) + (", ..." if len(bounds) > 8 else "")
            raise ValueError(f"chunk_attention: {name} must rise from 0 to {total} (tokens), got [{shown}]")
    if not isinstance(score_window, int) or isinstance(score_window, bool) or score_window < 0:
        raise ValueError(f"chunk_attention: score_window must be an int >= 0, got {score_window!r}")
    if score_reduce not in SCORE_REDUCTIONS:
        raise ValueError(f"chunk_attention: score_reduce {score_reduce!r} is not one of {', '.join(SCORE_REDUCTIONS)}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool \
                or tuple(key_mask.shape) != (total_k, num_heads):
            raise ValueError(f"chunk_attention: key_mask must be a bool tensor [{total_k}, {num_heads}] "
                             f"(total_k, query heads), got {getattr(key_mask, 'dtype', type(key_mask).__name__)} "
                             f"{tuple(getattr(key_mask, 'shape', ()))}")
        if key_mask.device != q.device:
            raise ValueError(f"chunk_attention: key_mask is on {key_mask.device}, q on {q.device}")
    return bounds_q, bounds_k, num_heads // num_kv_heads


def _reduce_scores(per_head: torch.Tensor, num_kv_heads: int, score_reduce: str) -> torch.Tensor:
    """[total_k, H] per query head -> [total_k, H_kv] over each GQA group (or unchanged for "none")."""
    if score_reduce == "none":
        return per_head
    grouped = per_head.view(per_head.shape[0], num_kv_heads, -1)
    if score_reduce == "sum":
        return grouped.sum(-1)
    if score_reduce == "mean":
        return grouped.mean(-1)
    return grouped.amax(-1)


# --------------------------------------------------------------------------------------------------
# Triton launch wrapper
# --------------------------------------------------------------------------------------------------


def chunk_attention_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, *, sm_scale=None, causal=True, score_window=0,
                           score_reduce="sum", key_mask=None, return_lse=True, bounds_q=None, bounds_k=None,
                           config=None):
    """Triton path (CUDA, or CPU under TRITON_INTERPRET=1). Always returns lse (return_lse is ignored).
    `config` (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the tuned or default tiles (the tuner)."""
    bounds_q, bounds_k, group = _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, score_window, score_reduce,
                                            key_mask, bounds_q=bounds_q, bounds_k=bounds_k)
    total_q, num_heads, head_dim = q.shape
    total_k, num_kv_heads, _ = k.shape
    _check_head_dim_for_triton(head_dim)
    interpret = triton_interpret_enabled()
    if q.device.type != "cuda" and not interpret:
        raise ValueError("chunk_attention: the Triton path needs CUDA tensors, or TRITON_INTERPRET=1 on CPU")
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    num_seqs = len(bounds_q) - 1
    max_len_q = max(b - a for a, b in zip(bounds_q[:-1], bounds_q[1:]))
    max_len_k = max(b - a for a, b in zip(bounds_k[:-1], bounds_k[1:]))
    entry = {"config": config} if config is not None else tuned(
        q.device, "chunk_attention", max_len_k, dtype=_TRITON_DTYPE_NAMES[q.dtype], head_dim=head_dim, group=group,
        window=bool(score_window))
    cfg = _launch_config(q.dtype, head_dim, entry)

    max_window = min(score_window, max_len_q)
    num_window_programs = triton.cdiv(max_window, cfg["W_BLOCK"])
    num_q_tiles = triton.cdiv(max_len_q, cfg["BLOCK_M"])

    out = _new_buffer((total_q, num_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = _new_buffer((total_q, num_heads), dtype=torch.float32, device=q.device)
    # One fp32 slice per window program; the kernel writes every key of every sequence in each.
    partial_scores = _new_buffer((max(num_window_programs, 1), total_k, num_heads), dtype=torch.float32,
                                 device=q.device) if score_window else lse
    if key_mask is not None:
        # Head-major copy (total_k * H bytes): each key tile's mask is then one contiguous,
        # vectorisable load instead of a gather with stride H.
        key_mask_u8 = key_mask.t().contiguous().view(torch.uint8)
        stride_mh, stride_mt = key_mask_u8.stride()
    else:
        key_mask_u8 = torch.zeros(1, dtype=torch.uint8, device=q.device)
        stride_mt = stride_mh = 0

    grid = (num_window_programs + num_q_tiles, num_seqs, num_heads)
    if grid[0] > 0 and total_q > 0:
        _chunk_attention_fwd_kernel[grid](
            q, k, v, out, lse, partial_scores, key_mask_u8, cu_seqlens_q, cu_seqlens_k,
            sm_scale * LOG2E, group, score_window, num_window_programs,
            *q.stride(), *k.stride(), *v.stride(),
            out.stride(0), out.stride(1), lse.stride(0),
            partial_scores.stride(0) if score_window else 0, partial_scores.stride(1) if score_window else 0,
            stride_mt, stride_mh,
            HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], W_BLOCK=cfg["W_BLOCK"],
            CAUSAL=bool(causal), HAS_KEY_MASK=key_mask is not None, UPCAST=interpret,
            DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    scores = None
    if score_window:
        if num_window_programs == 0:  # every sequence has Lq = 0: no window row sees anything
            partial_scores.zero_()
        per_head = partial_scores.sum(0) if num_window_programs > 1 else partial_scores[0]
        scores = _reduce_scores(per_head, num_kv_heads, score_reduce)
    return out, lse, scores


# --------------------------------------------------------------------------------------------------
# PyTorch CPU path
# --------------------------------------------------------------------------------------------------

# SDPA's CPU flash kernel also returns the log-sum-exp; the public SDPA does not.
_CPU_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _visible_mask(rows, num_keys, seq_len_q, seq_len_k, causal, excluded):
    """Bool [heads or 1, len(rows), num_keys]: True where query row sees the key."""
    cols = torch.arange(num_keys, device=rows.device)
    if causal:
        allowed = (cols[None, :] <= rows[:, None] + (seq_len_k - seq_len_q))[None]
    else:
        allowed = torch.ones(1, rows.numel(), num_keys, dtype=torch.bool, device=rows.device)
    if excluded is not None:  # [H, num_keys]
        allowed = allowed & ~excluded[:, None, :]
    return allowed


def _grouped_scores_fp32(q, k, scale):
    """[H, n, d] x [H_kv, Lk, d] -> fp32 [H, n, Lk] without expanding K over the GQA group."""
    num_heads, n, head_dim = q.shape
    num_kv_heads = k.shape[0]
    qg = q.float().reshape(num_kv_heads, (num_heads // num_kv_heads) * n, head_dim)
    return torch.matmul(qg, k.float().transpose(1, 2)).mul_(scale).view(num_heads, n, -1)


def _sdpa_with_lse(q, k, v, allowed, is_causal, scale, need_lse):
    """q [H, n, d], k/v [H_kv, L, d], allowed bool [1 or H, n, L] or None -> out [H, n, d], lse fp32 [H, n]."""
    if _CPU_FLASH_WITH_LSE is not None and q.device.type == "cpu":
        attn_mask = None
        if allowed is not None:
            attn_mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
            attn_mask = attn_mask[None]
        out, lse = _CPU_FLASH_WITH_LSE(q[None], k[None], v[None], is_causal=is_causal, attn_mask=attn_mask, scale=scale)
        return out[0], (lse[0] if need_lse else None)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=None if allowed is None else allowed[None], is_causal=is_causal,
        scale=scale, enable_gqa=True)[0]
    lse = None
    if need_lse:  # blockwise so [rows, keys] stays small
        num_heads, n, _ = q.shape
        seq_len_k = k.shape[1]
        rows_per_block = max(1, min(n, _TORCH_BLOCK_ELEMENTS // max(1, num_heads * seq_len_k)))
        lse = torch.empty(num_heads, n, dtype=torch.float32, device=q.device)
        for r0 in range(0, n, rows_per_block):
            r1 = min(n, r0 + rows_per_block)
            s = _grouped_scores_fp32(q[:, r0:r1], k, scale)
            if allowed is not None:
                s.masked_fill_(~allowed[:, r0:r1], float("-inf"))
            elif is_causal:  # top-left == bottom-right here: square
                rows = torch.arange(r0, r1, device=q.device)
                s.masked_fill_(torch.arange(seq_len_k, device=q.device)[None, None, :] > rows[None, :, None],
                               float("-inf"))
            lse[:, r0:r1] = torch.logsumexp(s, -1)
    return out, lse


def _torch_attention_one(q, k, v, excluded, causal, scale, need_lse, out, lse):
    """One sequence: q [H, Lq, d], k/v [H_kv, Lk, d], excluded [H, Lk] or None; writes out [H, Lq, d] and
    lse [H, Lq] views."""
    num_heads, seq_len_q, _ = q.shape
    seq_len_k = k.shape[1]
    if seq_len_k == 0:
        out.zero_()
        if need_lse:
            lse.fill_(float("-inf"))
        return
    if excluded is None and (not causal or seq_len_q == seq_len_k):
        o, l = _sdpa_with_lse(q, k, v, None, causal, scale, need_lse)
        out.copy_(o)
        if need_lse:
            lse.copy_(l)
        return
    # Rectangular causal or key_mask: explicit masks, query rows in blocks so the mask stays small,
    # keys cut at the last one the block can see.
    mask_heads = num_heads if excluded is not None else 1
    rows_per_block = max(1, min(seq_len_q, _TORCH_BLOCK_ELEMENTS // (mask_heads * seq_len_k)))
    for r0 in range(0, seq_len_q, rows_per_block):
        r1 = min(seq_len_q, r0 + rows_per_block)
        keys_hi = min(seq_len_k, seq_len_k - seq_len_q + r1) if causal else seq_len_k
        if keys_hi <= 0:
            out[:, r0:r1].zero_()
            if need_lse:
                lse[:, r0:r1].fill_(float("-inf"))
            continue
        rows = torch.arange(r0, r1, device=q.device)
        allowed = _visible_mask(rows, keys_hi, seq_len_q, seq_len_k, causal,
                                None if excluded is None else excluded[:, :keys_hi])
        o, l = _sdpa_with_lse(q[:, r0:r1], k[:, :keys_hi], v[:, :keys_hi], allowed, False, scale, need_lse)
        # Rows with no visible key: zeros and -inf (SDPA may give NaN or lse 0 there).
        row_visible = allowed.any(-1).expand(num_heads, -1)
        out[:, r0:r1] = torch.where(row_visible[..., None], o, torch.zeros((), dtype=o.dtype))
        if need_lse:
            lse[:, r0:r1] = torch.where(row_visible, l, torch.full((), float("-inf")))


def _torch_window_scores_one(q_window, k, excluded, rows, seq_len_q, causal, scale):
    """Per query head column sums of the exact softmax over the window rows: fp32 [H, Lk]."""
    num_heads, n, _ = q_window.shape
    num_kv_heads, seq_len_k, _ = k.shape
    group = num_heads // num_kv_heads
    result = torch.empty(num_heads, seq_len_k, dtype=torch.float32, device=q_window.device)
    kv_per_block = max(1, min(num_kv_heads, _TORCH_BLOCK_ELEMENTS // max(1, group * n * seq_len_k)))
    for kv0 in range(0, num_kv_heads, kv_per_block):
        kv1 = min(num_kv_heads, kv0 + kv_per_block)
        h0, h1 = kv0 * group, kv1 * group
        s = _grouped_scores_fp32(q_window[h0:h1], k[kv0:kv1], scale)
        allowed = _visible_mask(rows, seq_len_k, seq_len_q, seq_len_k, causal,
                                None if excluded is None else excluded[h0:h1])
        s.masked_fill_(~allowed, float("-inf"))
        m = s.amax(-1, keepdim=True)
        s.sub_(torch.where(torch.isinf(m), torch.zeros((), device=m.device), m)).exp_()
        denom = s.sum(-1, keepdim=True)
        s.div_(torch.where(denom > 0, denom, torch.ones((), device=denom.device)))
        result[h0:h1] = s.sum(1)
    return result


def _torch_few_rows_batched(q, k, v, k_starts, k_lens, seq_len_q, causal, scale, window, out, lse, per_head):
    """n = len(k_lens) sequences with the same few query rows Lq (<= _FEW_ROWS) and Lk_b >= Lq keys each
    (no key mask): q [n*Lq, H, d] packed; sequence b's keys are k/v[k_starts[b]:k_starts[b] + k_lens[b]].
    Writes out [n*Lq, H, d], lse [n*Lq, H] (or None) and the per-head window scores rows of each
    sequence's keys in per_head [total_k, H] (or None), all from one fp32 softmax per block of sequences,
    keys padded to the block's longest. This is the question-suffix scoring shape (a few rows over each
    chunk's ~1K keys): one batched product replaces a masked SDPA call per sequence plus the window-score
    recomputation, where per-call overhead, not arithmetic, dominates."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    rows = group * seq_len_q
    n = len(k_lens)
    device = q.device
    b0 = 0
    while b0 < n:
        # A block: as many sequences as keep [nb, H, Lq, max Lk] under the element budget.
        b1, longest = b0 + 1, k_lens[b0]
        while b1 < n and (b1 + 1 - b0) * num_heads * seq_len_q * max(longest, k_lens[b1]) <= _TORCH_BLOCK_ELEMENTS:
            longest = max(longest, k_lens[b1])
            b1 += 1
        nb = b1 - b0
        spans = list(zip(k_starts[b0:b1], k_lens[b0:b1]))
        lens = torch.tensor(k_lens[b0:b1], device=device)
        cols = torch.arange(longest, device=device)
        # KV head outermost and everything contiguous, so both products are plain bmm calls without hidden
        # copies; the G query heads of a KV head share its keys without expanding K.
        # The scale folded into q (exact for head dim 64), not in place: in fp32 the reshapes may be q itself.
        qb = (q[b0 * seq_len_q:b1 * seq_len_q].reshape(nb, seq_len_q, num_kv_heads, group, head_dim)
              .permute(2, 0, 3, 1, 4).reshape(num_kv_heads, nb, rows, head_dim).float() * scale)
        # Each sequence's keys copied into its zero-padded slot, K converted to fp32 in the same pass (one
        # pass over K and one over V; a gather and a separate conversion would take two over K). The padding
        # is masked below; zeros keep 0 * V finite.
        # P @ V in the input precision (P rounded to it, fp32 accumulation), as FlashAttention-2 does:
        # half the fp32 GEMM work; the logits, softmax, lse and window scores stay fp32.
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # [H_kv, total_k, d]
        kb = _new_buffer((num_kv_heads, nb, longest, head_dim), dtype=torch.float32, device=device)
        vb = _new_buffer((num_kv_heads, nb, longest, head_dim), dtype=v.dtype, device=device)
        for j, (start, length) in enumerate(spans):
            kb[:, j, :length].copy_(kt[:, start:start + length])
            vb[:, j, :length].copy_(vt[:, start:start + length])
            if length < longest:
                kb[:, j, length:].zero_()
                vb[:, j, length:].zero_()
        s = torch.matmul(qb, kb.transpose(-1, -2)).view(num_kv_heads, nb, group, seq_len_q, longest)
        # Only the last columns can be hidden from some row (padding, causal diagonal); mask just those.
        first = min(k_lens[b0:b1]) - (seq_len_q if causal else 0)
        tail = cols[first:]
        hidden = tail[None, None, :] >= lens[:, None, None]                          # [nb, 1 or Lq, tail]
        if causal:
            rows_i = torch.arange(seq_len_q, device=device)
            hidden = hidden | (tail[None, None, :] > (lens[:, None, None] - seq_len_q + rows_i[None, :, None]))
        s[..., first:].masked_fill_(hidden[None, :, None], float("-inf"))
        m = s.amax(-1) if lse is not None else None  # finite: every row sees key 0 since Lk_b >= Lq
        # In place, one fused pass per row: ATen's softmax kernel (its vectorised exp) runs about twice as
        # fast as amax, sub, exp, sum and div as separate passes over the block.
        p = torch.ops.aten._softmax.out(s, -1, False, out=s)
        o = torch.matmul(p.view(num_kv_heads, nb, rows, longest).to(vb.dtype), vb)
        out[b0 * seq_len_q:b1 * seq_len_q] = (o.view(num_kv_heads, nb, group, seq_len_q, head_dim)
                                               .permute(1, 3, 0, 2, 4).reshape(nb * seq_len_q, num_heads, head_dim))
        if lse is not None:
            # p at the row's largest logit m is exp(m - lse) >= 1 / Lk: lse = m - log(max p), well conditioned.
            lse[b0 * seq_len_q:b1 * seq_len_q] = (m - p.amax(-1).log()).permute(1, 3, 0, 2).reshape(
                nb * seq_len_q, num_heads)
        if per_head is not None:
            w = min(window, seq_len_q)
            col_sums = p[:, :, :, seq_len_q - w:].sum(3).permute(1, 3, 0, 2)  # [nb, Lk_max, H_kv, G]
            for j, (start, length) in enumerate(spans):
                per_head[start:start + length] = col_sums[j, :length].reshape(length, num_heads)
        b0 = b1


# Sequences with at most this many query rows (and at least as many keys) take the batched explicit path;
# a run of them is cut where padding to the longest key length would waste more than this fraction.
_FEW_ROWS = 64
_PAD_WASTE = 0.25


def _few_rows_runs(bounds_q, bounds_k, key_mask):
    """Runs of consecutive sequences for _torch_few_rows_batched: [[sequence ids], ...], plus the ids of
    the sequences left to the per-sequence path."""
    runs, singles = [], []
    for b in range(len(bounds_q) - 1):
        seq_len_q, seq_len_k = bounds_q[b + 1] - bounds_q[b], bounds_k[b + 1] - bounds_k[b]
        if key_mask is not None or not 0 < seq_len_q <= min(_FEW_ROWS, seq_len_k):
            singles.append(b)
            continue
        if runs and runs[-1][-1] == b - 1 and bounds_q[b] - bounds_q[b - 1] == seq_len_q:
            lens = [bounds_k[x + 1] - bounds_k[x] for x in runs[-1]] + [seq_len_k]
            if max(lens) * (1 - _PAD_WASTE) <= min(lens):
                runs[-1].append(b)
                continue
        runs.append([b])
    return runs, singles


def chunk_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, *, sm_scale=None, causal=True, score_window=0,
                          score_reduce="sum", key_mask=None, return_lse=True, bounds_q=None, bounds_k=None):
    """PyTorch path (any device; tuned for CPU): SDPA per sequence, fp32 window scores; runs of sequences
    with the same few query rows (a question suffix over each chunk, the question pass) batched with fp32
    logits (`_torch_few_rows_batched`). lse is None when return_lse=False."""
    bounds_q, bounds_k, _ = _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, score_window, score_reduce, key_mask,
                                        bounds_q=bounds_q, bounds_k=bounds_k)
    total_q, num_heads, head_dim = q.shape
    total_k, num_kv_heads, _ = k.shape
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    out = _new_buffer((total_q, num_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = _new_buffer((total_q, num_heads), dtype=torch.float32, device=q.device) if return_lse else None
    per_head = _new_buffer((total_k, num_heads), dtype=torch.float32, device=q.device) if score_window else None
    runs, singles = _few_rows_runs(bounds_q, bounds_k, key_mask)
    for run in runs:
        q0, q1 = bounds_q[run[0]], bounds_q[run[-1] + 1]
        _torch_few_rows_batched(q[q0:q1], k, v, [bounds_k[b] for b in run],
                                [bounds_k[b + 1] - bounds_k[b] for b in run], (q1 - q0) // len(run),
                                causal, scale, score_window, out[q0:q1], lse[q0:q1] if return_lse else None,
                                per_head)
    for b in singles:
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        seq_len_q, seq_len_k = q1 - q0, k1 - k0
        qs = q[q0:q1].transpose(0, 1)
        ks = k[k0:k1].transpose(0, 1)
        vs = v[k0:k1].transpose(0, 1)
        excluded = key_mask[k0:k1].t() if key_mask is not None else None
        if seq_len_q:
            _torch_attention_one(qs, ks, vs, excluded, causal, scale, return_lse,
                                 out[q0:q1].transpose(0, 1), lse[q0:q1].t() if return_lse else None)
        if score_window:
            window_rows = min(score_window, seq_len_q)
            if window_rows == 0 or seq_len_k == 0:
                per_head[k0:k1] = 0.0
                continue
            rows = torch.arange(seq_len_q - window_rows, seq_len_q, device=q.device)
            per_head[k0:k1] = _torch_window_scores_one(qs[:, seq_len_q - window_rows:], ks, excluded, rows,
                                                       seq_len_q, causal, scale).t()
    scores = _reduce_scores(per_head, num_kv_heads, score_reduce) if score_window else None
    return out, lse, scores


# --------------------------------------------------------------------------------------------------
# Naive reference (test oracle)
# --------------------------------------------------------------------------------------------------


def chunk_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, sm_scale=None, causal=True, score_window=0,
                              score_reduce="sum", key_mask=None, dtype=torch.float64):
    """Materialises softmax(QK^T) per sequence with everything computed in `dtype` (float64 for the
    oracle; the input dtype gives the same-precision error yardstick). Returns out, lse, scores, all
    in `dtype` (scores None when score_window == 0)."""
    bounds_q, bounds_k, group = _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, score_window, score_reduce,
                                            key_mask, need_float=False)
    total_q, num_heads, head_dim = q.shape
    total_k, num_kv_heads, _ = k.shape
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    out = torch.zeros(total_q, num_heads, head_dim, dtype=dtype, device=q.device)
    lse = torch.full((total_q, num_heads), float("-inf"), dtype=dtype, device=q.device)
    per_head = torch.zeros(total_k, num_heads, dtype=dtype, device=q.device)
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        seq_len_q, seq_len_k = q1 - q0, k1 - k0
        if seq_len_q == 0 or seq_len_k == 0:
            continue
        qs = q[q0:q1].to(dtype).transpose(0, 1)
        ks = k[k0:k1].to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[k0:k1].to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        s = torch.matmul(qs, ks.transpose(1, 2)) * scale
        allowed = torch.ones(seq_len_q, seq_len_k, dtype=torch.bool, device=q.device)
        if causal:
            allowed = torch.ones_like(allowed).tril(seq_len_k - seq_len_q)
        allowed = allowed[None].expand(num_heads, -1, -1)
        if key_mask is not None:
            allowed = allowed & ~key_mask[k0:k1].t()[:, None, :]
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
        out[q0:q1] = torch.matmul(p, vs).transpose(0, 1)
        lse[q0:q1] = row_lse.t()
        if score_window:
            per_head[k0:k1] = p[:, seq_len_q - min(score_window, seq_len_q):].sum(1).t()
    scores = _reduce_scores(per_head, num_kv_heads, score_reduce) if score_window else None
    return out, lse, scores


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def chunk_attention_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, *, sm_scale=None, causal=True, bounds_q=None,
                         bounds_k=None):
    """torch's SDPA per sequence (cuDNN / FlashAttention on a GPU), for what it computes as well: no window
    scores, no key mask, no lse, and under `causal` square sequences (its causal mask is top-left aligned).
    The dispatch takes it where the tuning table says it beats the Triton kernel."""
    bounds_q, bounds_k, _ = _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, 0, "sum", None,
                                        bounds_q=bounds_q, bounds_k=bounds_k)
    if not sdpa_can_run(bounds_q, bounds_k, causal, 0, None, False):
        raise ValueError("chunk_attention_sdpa: causal sequences must have as many queries as keys")
    out = _new_buffer(q.shape, dtype=q.dtype, device=q.device)
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if q1 == q0:
            continue
        if k1 == k0:
            out[q0:q1] = 0
            continue
        out[q0:q1] = torch.nn.functional.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None], v[k0:k1].transpose(0, 1)[None],
            is_causal=causal, scale=sm_scale, enable_gqa=True)[0].transpose(0, 1)
    return out, None, None


def sdpa_can_run(bounds_q, bounds_k, causal, score_window, key_mask, return_lse) -> bool:
    if score_window or key_mask is not None or return_lse:
        return False
    return not causal or all(bounds_q[b + 1] - bounds_q[b] == bounds_k[b + 1] - bounds_k[b]
                             for b in range(len(bounds_q) - 1))


def choose_path(backend, q, k, causal, score_window, key_mask, return_lse, bounds_q, bounds_k) -> str:
    """"triton", "torch" or "sdpa": the backend's choice, except that on a GPU whose tuning table says SDPA
    beats the tuned kernel for this shape class, SDPA is taken where it computes the same thing. That needs
    the lengths on the host (`bounds_q`, `bounds_k`): without them the Triton kernel runs."""
    path = resolve_backend(backend, q.device)
    if path != "triton" or q.device.type != "cuda" or bounds_q is None or bounds_k is None:
        return path
    if not sdpa_can_run(bounds_q, bounds_k, causal, score_window, key_mask, return_lse):
        return path
    group = q.shape[1] // max(1, k.shape[1])
    max_len_k = max(b - a for a, b in zip(bounds_k[:-1], bounds_k[1:]))
    entry = tuned(q.device, "chunk_attention", max_len_k, dtype=_TRITON_DTYPE_NAMES.get(q.dtype), head_dim=q.shape[2],
                  group=group, window=False)
    return "sdpa" if entry is not None and entry.get("use") == "sdpa" else path


def chunk_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, sm_scale=None, causal=True, score_window=0,
                    score_reduce="sum", key_mask=None, return_lse=True, backend=None, bounds_q=None, bounds_k=None):
    """Varlen (bottom-right causal) attention over packed chunks, with SnapKV window scores.

    q [total_q, H, d]; k, v [total_k, H_kv, d]; cu_seqlens_q/k int32 [B+1]; key_mask bool [total_k, H]
    (True = excluded). Returns (out [total_q, H, d] in q.dtype, lse fp32 [total_q, H] (natural log;
    None from the torch and SDPA paths with return_lse=False), scores fp32 [total_k, H_kv] ([total_k, H]
    for score_reduce="none"), or None when score_window == 0). `bounds_q` / `bounds_k`: host lists equal
    to cu_seqlens_q / cu_seqlens_k, where the caller has them: on a GPU nothing is then read back."""
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"chunk_attention: q must be a tensor, got {type(q).__name__}")
    kwargs = dict(sm_scale=sm_scale, causal=causal, score_window=score_window, score_reduce=score_reduce,
                  key_mask=key_mask, return_lse=return_lse, bounds_q=bounds_q, bounds_k=bounds_k)
    path = choose_path(backend, q, k, causal, score_window, key_mask, return_lse, bounds_q, bounds_k)
    if path == "sdpa":
        return chunk_attention_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, sm_scale=sm_scale, causal=causal,
                                    bounds_q=bounds_q, bounds_k=bounds_k)
    if path == "triton":
        return chunk_attention_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs)
    return chunk_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs)
