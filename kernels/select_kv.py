"""Per-head KV selection for SnapKV-style cache pruning: max-pool the per-key scores, keep the top
`budget` keys of every (sequence, KV head), then gather the kept K/V rows into a dense cache.

    keep, keep_lens = select_kv(scores, cu_seqlens_k, budget, pool_kernel=7, protect=None)
    k_c, v_c = gather_kv(k, v, cu_seqlens_k, keep)

Layouts (packed varlen, sequences back to back as in flash_attn_varlen):
    scores   float32 [total_k, H_kv]   per-key scores, already reduced over each GQA group
    protect  bool    [total_k]         optional; protected keys are always kept
    keep     int32   [B, H_kv, budget] sequence-local positions, ascending, padded with -1
    keep_lens int32  [B]               min(budget, len_b), the same for every head
    k, v     [total_k, H_kv, d]  ->  k_c, v_c [B, H_kv, budget, d], rows past keep_lens zero

Selection rule (the reference below is the definition): pooled[j] = max(scores[j - p//2 : j + p//2 + 1])
clipped to the sequence; keys are ranked by (protected first, then pooled descending, then position
ascending) and the first min(budget, len) are kept. -0.0 and +0.0 rank as equal. NaN scores are
not supported.

Triton design (select): one program per (sequence, KV head), bounded registers for any length.
  1. pool pass: max over the p shifted loads of each tile, turn the pooled float into an
     order-preserving uint32 key (protected keys -> 0xFFFFFFFF, above every non-NaN score) and park it
     in an int32 scratch [H_kv, total_k] (head-major, so a program's keys are contiguous);
  2. radix select, 8 passes of 4 bits from the MSB: each pass counts, for all 16 digits at once
     ([BLOCK, 16] compares), how many keys reach threshold|digit, and appends the largest digit whose
     count is still >= n; the result is exactly the n-th largest key;
  3. one pass counts keys > threshold, so the ties at the threshold to keep are the
     lowest-positioned n - count(key > threshold) of them;
  4. one compaction pass writes the kept positions in ascending order, slots from running cumsums.
  Every pass streams the program's keys tile by tile, so registers do not grow with the length,
  and nothing goes back to the host.

Cost, for N = total_k keys, H = H_kv heads, p = pool_kernel, budget Bg, B sequences:
  select_kv: about (p + 16 * 8 + 3) * N * H compares (the [BLOCK, 16] radix counts dominate);
             bytes: 4*N*H*p score reads (p-1 of every p hit cache) + 4*N*H scratch writes
             + 10 * 4*N*H scratch reads (L1/L2-resident per program) + 4*B*H*Bg keep writes.
  gather_kv: no FLOPs; bytes: 4*B*H*Bg index reads + 2 * 2*B*H*Bg*d*elt (K and V, read and write).
"""
import torch
import triton
import triton.language as tl

from parallelcomp_triton.errors import ParallelCompError
from parallelcomp_triton.kernels.dispatch import resolve_backend, triton_interpret_enabled

# Keys a select program streams per tile: 512 keys x 8 warps = 2 keys per thread, x 16 radix digits
# in the counting passes. The interpreter pays per tile, not per key, so it takes 1024.
SELECT_BLOCK = 512
SELECT_BLOCK_INTERPRET = 1024
RADIX_BITS = 4
SELECT_NUM_WARPS = 8
GATHER_TILE_ELEMENTS = 4096  # rows x head dim per gather program: 32 values of K (then V) per thread
GATHER_NUM_WARPS = 4


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------


@triton.jit
def _select_kv_kernel(
    Scores, Protect, CuSeqlens, KeyScratch, Keep, KeepLens,
    total_k, num_kv_heads, budget,
    POOL_RADIUS: tl.constexpr, HAS_PROTECT: tl.constexpr, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_start = tl.load(CuSeqlens + seq)
    seq_len = tl.load(CuSeqlens + seq + 1) - seq_start
    n_keep = tl.minimum(seq_len, budget)
    offs = tl.arange(0, BLOCK)
    scratch = KeyScratch + head.to(tl.int64) * total_k + seq_start
    keep_row = Keep + (seq.to(tl.int64) * num_kv_heads + head) * budget

    # 1. pooled, order-preserving keys -> scratch.
    score_row = Scores + seq_start.to(tl.int64) * num_kv_heads + head
    for tile in range(0, seq_len, BLOCK):
        pos = tile + offs
        in_seq = pos < seq_len
        score_ptrs = score_row + pos * num_kv_heads
        pooled = tl.full([BLOCK], float("-inf"), tl.float32)
        for shift in tl.static_range(-POOL_RADIUS, POOL_RADIUS + 1):
            # The window clipped to the sequence; lanes past its end are never stored.
            ok = (pos >= -shift) & (pos < seq_len - shift)
            pooled = tl.maximum(pooled, tl.load(score_ptrs + shift * num_kv_heads, mask=ok, other=float("-inf")))
        bits = pooled.to(tl.int32, bitcast=True)
        bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 ranks like +0.0
        # Radix-sort flip: negative floats flip every bit, positive ones only the sign bit.
        key = bits ^ ((bits >> 31) | -2147483648)
        if HAS_PROTECT:
            protected = tl.load(Protect + seq_start + pos, mask=in_seq, other=0) != 0
            key = tl.where(protected, -1, key)  # 0xFFFFFFFF: above every score's key
        tl.store(scratch + pos, key, mask=in_seq)
    # Other threads of this program read what this one wrote.
    tl.debug_barrier()

    # 2. radix select: threshold = the n_keep-th largest key (unsigned order), RADIX_BITS per pass.
    #    threshold always satisfies count(key >= threshold) >= n_keep; each pass appends the largest
    #    digit that keeps it so, found from the counts for all 2^RADIX_BITS digits at once.
    digit = tl.arange(0, 1 << RADIX_BITS).to(tl.uint32)
    threshold = tl.full((), 0, tl.uint32)
    for shift_step in tl.static_range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (shift_step + 1)
        candidates = threshold | (digit << shift)
        counts = tl.zeros([1 << RADIX_BITS], tl.int32)
        for tile in range(0, seq_len, BLOCK):
            pos = tile + offs
            # Lanes past the end load key 0, which only the digit-0 candidate can count, and the
            # digit-0 count qualifies anyway (threshold invariant): no mask needed.
            key = tl.load(scratch + pos, mask=pos < seq_len, other=0).to(tl.uint32, bitcast=True)
            counts += tl.sum((key[:, None] >= candidates[None, :]).to(tl.int32), axis=0)
        best_digit = tl.sum((counts >= n_keep).to(tl.int32), axis=0) - 1  # digit 0 always qualifies
        threshold = threshold | (best_digit.to(tl.uint32) << shift)

    # 3. ties at the threshold: keep the lowest-positioned n_keep - count(key > threshold).
    n_above = tl.zeros((), tl.int32)
    for tile in range(0, seq_len, BLOCK):
        pos = tile + offs
        key = tl.load(scratch + pos, mask=pos < seq_len, other=0).to(tl.uint32, bitcast=True)
        n_above += tl.sum((key > threshold).to(tl.int32), axis=0)  # lanes past the end load 0
    n_ties_kept = n_keep - n_above

    # 4. compaction in position order; slots and tie ranks from running inclusive cumsums.
    n_written = tl.zeros((), tl.int32)
    n_ties_seen = tl.zeros((), tl.int32)
    for tile in range(0, seq_len, BLOCK):
        pos = tile + offs
        in_seq = pos < seq_len
        key = tl.load(scratch + pos, mask=in_seq, other=0).to(tl.uint32, bitcast=True)
        tie = ((key == threshold) & in_seq).to(tl.int32)
        tie_rank = n_ties_seen + tl.cumsum(tie, axis=0) - tie
        kept = (key > threshold) | ((tie != 0) & (tie_rank < n_ties_kept))
        kept_i = kept.to(tl.int32)
        slot = n_written + tl.cumsum(kept_i, axis=0) - kept_i
        tl.store(keep_row + slot, pos, mask=kept)
        n_written += tl.sum(kept_i, axis=0)
        n_ties_seen += tl.sum(tie, axis=0)

    for tile in range(0, budget, BLOCK):
        slot = tile + offs
        tl.store(keep_row + slot, tl.full([BLOCK], -1, tl.int32), mask=(slot >= n_keep) & (slot < budget))
    if head == 0:
        tl.store(KeepLens + seq, n_keep)


@triton.jit
def _gather_kv_kernel(
    K, V, CuSeqlens, Keep, KOut, VOut,
    num_kv_heads, budget,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq_head = tl.program_id(0)  # seq * num_kv_heads + head
    head = seq_head % num_kv_heads
    seq = seq_head // num_kv_heads
    slot = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_ok = slot < budget
    dim = tl.arange(0, BLOCK_D)
    dim_ok = dim < HEAD_DIM

    keep_pos = tl.load(Keep + seq_head.to(tl.int64) * budget + slot, mask=slot_ok, other=-1)
    row = (tl.load(CuSeqlens + seq) + keep_pos).to(tl.int64)
    src_ok = (keep_pos >= 0)[:, None] & dim_ok[None, :]
    dst_ok = slot_ok[:, None] & dim_ok[None, :]
    dst = (seq_head.to(tl.int64) * budget + slot)[:, None] * HEAD_DIM + dim[None, :]
    # A plain copy: no arithmetic, so bf16 is exact under the interpreter too.
    k = tl.load(K + row[:, None] * stride_k_tok + head * stride_k_head + dim[None, :], mask=src_ok, other=0.0)
    tl.store(KOut + dst, k, mask=dst_ok)
    v = tl.load(V + row[:, None] * stride_v_tok + head * stride_v_head + dim[None, :], mask=src_ok, other=0.0)
    tl.store(VOut + dst, v, mask=dst_ok)


def _select_outputs(out, batch, num_kv_heads, budget, device):
    if out is None:
        return (torch.empty((batch, num_kv_heads, budget), dtype=torch.int32, device=device),
                torch.empty((batch,), dtype=torch.int32, device=device))
    keep, keep_lens = out
    if (keep.shape != (batch, num_kv_heads, budget) or keep.dtype != torch.int32 or not keep.is_contiguous()
            or keep_lens.shape != (batch,) or keep_lens.dtype != torch.int32):
        raise ParallelCompError("select_kv out: expected contiguous int32 keep [B, H_kv, budget] and keep_lens [B]")
    return keep, keep_lens


def select_kv_triton(scores, cu_seqlens_k, budget, *, pool_kernel=7, protect=None, out=None, block=None):
    block = block or (SELECT_BLOCK_INTERPRET if triton_interpret_enabled() else SELECT_BLOCK)
    total_k, num_kv_heads = scores.shape
    batch = cu_seqlens_k.shape[0] - 1
    keep, keep_lens = _select_outputs(out, batch, num_kv_heads, budget, scores.device)
    if batch == 0 or num_kv_heads == 0:
        keep_lens.copy_((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).clamp(max=budget))
        return keep, keep_lens
    scratch = torch.empty((num_kv_heads, total_k), dtype=torch.int32, device=scores.device)
    _select_kv_kernel[(batch, num_kv_heads)](
        scores.contiguous(), protect.contiguous() if protect is not None else scores, cu_seqlens_k.contiguous(),
        scratch, keep, keep_lens,
        total_k, num_kv_heads, budget,
        POOL_RADIUS=pool_kernel // 2, HAS_PROTECT=protect is not None, BLOCK=block, RADIX_BITS=RADIX_BITS,
        num_warps=SELECT_NUM_WARPS,
    )
    return keep, keep_lens


def _gather_outputs(out, k, v, batch, num_kv_heads, budget):
    shape = (batch, num_kv_heads, budget, k.shape[-1])
    if out is None:
        return torch.empty(shape, dtype=k.dtype, device=k.device), torch.empty(shape, dtype=v.dtype, device=v.device)
    k_out, v_out = out
    if (k_out.shape != shape or v_out.shape != shape or k_out.dtype != k.dtype or v_out.dtype != v.dtype
            or not k_out.is_contiguous() or not v_out.is_contiguous()):
        raise ParallelCompError(f"gather_kv out: expected two contiguous {tuple(shape)} tensors of k's and v's dtype")
    return k_out, v_out


def _gather_block_n(head_dim):
    return max(16, GATHER_TILE_ELEMENTS // triton.next_power_of_2(head_dim))


def gather_kv_triton(k, v, cu_seqlens_k, keep, *, out=None, block_n=None):
    batch, num_kv_heads, budget = keep.shape
    head_dim = k.shape[-1]
    block_n = block_n or _gather_block_n(head_dim)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    k_out, v_out = _gather_outputs(out, k, v, batch, num_kv_heads, budget)
    if k_out.numel() == 0:
        return k_out, v_out
    grid = (batch * num_kv_heads, triton.cdiv(budget, block_n))
    _gather_kv_kernel[grid](
        k, v, cu_seqlens_k, keep.contiguous(), k_out, v_out,
        num_kv_heads, budget,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HEAD_DIM=head_dim, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=GATHER_NUM_WARPS,
    )
    return k_out, v_out


# --------------------------------------------------------------------------------------------------
# PyTorch (fast CPU path)
# --------------------------------------------------------------------------------------------------


def select_kv_torch(scores, cu_seqlens_k, budget, *, pool_kernel=7, protect=None, out=None):
    total_k, num_kv_heads = scores.shape
    batch = cu_seqlens_k.shape[0] - 1
    keep, keep_lens = _select_outputs(out, batch, num_kv_heads, budget, scores.device)
    cu = cu_seqlens_k.long()
    lens = cu[1:] - cu[:-1]
    max_len = int(lens.max()) if batch > 0 else 0
    if max_len == 0:
        keep.fill_(-1)
        keep_lens.zero_()
        return keep, keep_lens

    pos = torch.arange(max_len, device=scores.device)
    in_seq = pos[None, :] < lens[:, None]                                     # [B, Lmax]
    rows = (cu[:-1, None] + pos[None, :]).clamp_(max=total_k - 1)
    padded = scores.float()[rows].permute(0, 2, 1)                           # [B, H, Lmax]
    padded = padded.masked_fill(~in_seq[:, None, :], float("-inf"))
    if pool_kernel > 1:
        # -inf padding outside the sequence == the window clipped to the sequence.
        padded = torch.nn.functional.max_pool1d(
            padded.reshape(batch * num_kv_heads, 1, max_len), pool_kernel, stride=1, padding=pool_kernel // 2
        ).view(batch, num_kv_heads, max_len)
    pooled = torch.where(padded == 0, 0.0, padded)  # -0.0 ranks like +0.0

    # One int64 per key orders by (pooled desc, position asc): signed-ordered float bits in the high
    # word, (2^32 - 1 - position) in the low word; so topk never meets a tie.
    bits = pooled.contiguous().view(torch.int32)
    score_key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()
    if protect is not None:
        protected = protect[rows].bool() & in_seq
        score_key = torch.where(protected[:, None, :], 0x7FFFFFFF, score_key)
    rank_key = (score_key << 32) + (0xFFFFFFFF - pos)
    rank_key = rank_key.masked_fill(~in_seq[:, None, :], torch.iinfo(torch.int64).min)

    n_top = min(budget, max_len)
    top_pos = rank_key.topk(n_top, dim=-1, sorted=False).indices                # [B, H, n_top]
    # Keys outside the sequence rank last: they come up only when len < n_top. Sort them to the end.
    outside = top_pos >= lens[:, None, None]
    top_pos = top_pos.masked_fill(outside, max_len).sort(dim=-1).values
    top_pos = top_pos.masked_fill(top_pos == max_len, -1)
    keep[..., :n_top] = top_pos
    keep[..., n_top:] = -1
    keep_lens.copy_(lens.clamp(max=budget))
    return keep, keep_lens


def gather_kv_torch(k, v, cu_seqlens_k, keep, *, out=None):
    batch, num_kv_heads, budget = keep.shape
    k_out, v_out = _gather_outputs(out, k, v, batch, num_kv_heads, budget)
    present = keep >= 0
    if k.shape[0] == 0:
        k_out.zero_()
        v_out.zero_()
        return k_out, v_out
    rows = (cu_seqlens_k[:-1].long()[:, None, None] + keep.long()).masked_fill_(~present, 0)
    heads = torch.arange(num_kv_heads, device=k.device)[None, :, None]
    all_present = bool(present.all())  # the usual chunk fills every slot; short ones leave empty slots
    for src, dst in ((k, k_out), (v, v_out)):
        # index_select over a flat [rows, d] view, several times faster than advanced indexing on the CPU,
        # where one exists without copying src; other strided views (a fused KV buffer) index directly.
        if src.is_contiguous():
            torch.index_select(src.view(-1, src.shape[-1]), 0, (rows * num_kv_heads + heads).reshape(-1),
                               out=dst.view(-1, dst.shape[-1]))
        elif src.transpose(0, 1).is_contiguous():  # [H_kv, total_k, d] storage seen transposed
            torch.index_select(src.transpose(0, 1).reshape(-1, src.shape[-1]), 0,
                               (heads * src.shape[0] + rows).reshape(-1), out=dst.view(-1, dst.shape[-1]))
        else:
            dst.copy_(src[rows, heads])
        if not all_present:
            dst.masked_fill_(~present[..., None], 0)
    return k_out, v_out


# --------------------------------------------------------------------------------------------------
# Naive reference (test oracle)
# --------------------------------------------------------------------------------------------------


def select_kv_reference(scores, cu_seqlens_k, budget, *, pool_kernel=7, protect=None):
    """The selection rule in plain Python, one (sequence, head) at a time."""
    num_kv_heads = scores.shape[1]
    cu = cu_seqlens_k.tolist()
    batch = len(cu) - 1
    radius = pool_kernel // 2
    keep = torch.full((batch, num_kv_heads, budget), -1, dtype=torch.int32)
    keep_lens = torch.zeros(batch, dtype=torch.int32)
    for b in range(batch):
        start, end = cu[b], cu[b + 1]
        length = end - start
        n_keep = min(budget, length)
        keep_lens[b] = n_keep
        protected = [False] * length if protect is None else [bool(x) for x in protect[start:end].tolist()]
        for h in range(num_kv_heads):
            s = scores[start:end, h].tolist()
            pooled = [max(s[max(0, j - radius):j + radius + 1]) for j in range(length)]
            order = sorted(range(length), key=lambda j: (not protected[j], 0.0 if protected[j] else -pooled[j], j))
            kept = sorted(order[:n_keep])
            keep[b, h, :n_keep] = torch.tensor(kept, dtype=torch.int32)
    return keep.to(scores.device), keep_lens.to(scores.device)


def gather_kv_reference(k, v, cu_seqlens_k, keep):
    batch, num_kv_heads, budget = keep.shape
    k_out = torch.zeros((batch, num_kv_heads, budget, k.shape[-1]), dtype=k.dtype, device=k.device)
    v_out = torch.zeros((batch, num_kv_heads, budget, v.shape[-1]), dtype=v.dtype, device=v.device)
    cu = cu_seqlens_k.tolist()
    for b in range(batch):
        for h in range(num_kv_heads):
            for slot, p in enumerate(keep[b, h].tolist()):
                if p >= 0:
                    k_out[b, h, slot] = k[cu[b] + p, h]
                    v_out[b, h, slot] = v[cu[b] + p, h]
    return k_out, v_out


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _check_select_args(scores, cu_seqlens_k, budget, pool_kernel, protect):
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ParallelCompError(f"select_kv budget: expected an integer >= 1, got {budget!r}")
    if not isinstance(pool_kernel, int) or pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ParallelCompError(f"select_kv pool_kernel: expected an odd integer >= 1, got {pool_kernel!r}")
    if scores.dim() != 2 or scores.dtype != torch.float32:
        raise ParallelCompError(f"select_kv scores: expected float32 [total_k, H_kv], got {scores.dtype} "
                                f"{tuple(scores.shape)}")
    if cu_seqlens_k.dim() != 1 or cu_seqlens_k.dtype != torch.int32 or cu_seqlens_k.shape[0] < 1:
        raise ParallelCompError("select_kv cu_seqlens_k: expected int32 [B + 1]")
    if cu_seqlens_k.device != scores.device:
        raise ParallelCompError("select_kv cu_seqlens_k: must be on the same device as scores")
    if protect is not None and (protect.shape != (scores.shape[0],) or protect.dtype != torch.bool
                                or protect.device != scores.device):
        raise ParallelCompError(f"select_kv protect: expected bool [{scores.shape[0]}] on scores' device")


def select_kv(scores, cu_seqlens_k, budget, *, pool_kernel=7, protect=None, out=None, backend=None):
    """Top-`budget` max-pooled keys per (sequence, KV head); see the module docstring.

    Returns (keep int32 [B, H_kv, budget], keep_lens int32 [B]). `out` optionally gives both buffers."""
    _check_select_args(scores, cu_seqlens_k, budget, pool_kernel, protect)
    if resolve_backend(backend, scores.device) == "triton":
        return select_kv_triton(scores, cu_seqlens_k, budget, pool_kernel=pool_kernel, protect=protect, out=out)
    return select_kv_torch(scores, cu_seqlens_k, budget, pool_kernel=pool_kernel, protect=protect, out=out)


def gather_kv(k, v, cu_seqlens_k, keep, *, out=None, backend=None):
    """k, v [total_k, H_kv, d] -> dense k_c, v_c [B, H_kv, budget, d]; slots where keep is -1 are zero."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ParallelCompError(f"gather_kv k/v: expected two [total_k, H_kv, d] tensors, got {tuple(k.shape)} "
                                f"and {tuple(v.shape)}")
    if keep.dim() != 3 or keep.dtype != torch.int32 or keep.shape[1] != k.shape[1]:
        raise ParallelCompError(f"gather_kv keep: expected int32 [B, {k.shape[1]}, budget], got {keep.dtype} "
                                f"{tuple(keep.shape)}")
    if cu_seqlens_k.shape != (keep.shape[0] + 1,):
        raise ParallelCompError(f"gather_kv cu_seqlens_k: expected [{keep.shape[0] + 1}] entries")
    if resolve_backend(backend, k.device) == "triton":
        return gather_kv_triton(k, v, cu_seqlens_k, keep, out=out)
    return gather_kv_torch(k, v, cu_seqlens_k, keep, out=out)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (kernels.report)
# --------------------------------------------------------------------------------------------------



def aot_specs(dtype: str, head_dim: int) -> list[dict]:
    """The GPU specialisations the runner launches, for kernels.report (dtype: "bf16", "fp16", "fp32")."""
    from parallelcomp_triton.kernels.report import aligned_attrs

    select = {
        "kernel": "select_kv",
        "fn": _select_kv_kernel,
        "signature": {
            "Scores": "*fp32", "Protect": "*i1", "CuSeqlens": "*i32", "KeyScratch": "*i32", "Keep": "*i32",
            "KeepLens": "*i32", "total_k": "i32", "num_kv_heads": "i32", "budget": "i32",
            "POOL_RADIUS": "constexpr", "HAS_PROTECT": "constexpr", "BLOCK": "constexpr", "RADIX_BITS": "constexpr",
        },
        "constexprs": {"POOL_RADIUS": 3, "HAS_PROTECT": True, "BLOCK": SELECT_BLOCK, "RADIX_BITS": RADIX_BITS},
        "num_warps": SELECT_NUM_WARPS,
        "num_stages": 1,
        "attrs": aligned_attrs(_select_kv_kernel, ["Scores", "CuSeqlens", "KeyScratch", "Keep", "KeepLens"]),
    }
    gather = {
        "kernel": "gather_kv",
        "fn": _gather_kv_kernel,
        "signature": {
            "K": f"*{dtype}", "V": f"*{dtype}", "CuSeqlens": "*i32", "Keep": "*i32",
            "KOut": f"*{dtype}", "VOut": f"*{dtype}",
            "num_kv_heads": "i32", "budget": "i32",
            "stride_k_tok": "i32", "stride_k_head": "i32", "stride_v_tok": "i32", "stride_v_head": "i32",
            "HEAD_DIM": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr",
        },
        "constexprs": {"HEAD_DIM": head_dim, "BLOCK_N": _gather_block_n(head_dim),
                       "BLOCK_D": triton.next_power_of_2(head_dim)},
        "num_warps": GATHER_NUM_WARPS,
        "num_stages": 1,
        "attrs": aligned_attrs(_gather_kv_kernel, ["K", "V", "CuSeqlens", "Keep", "KOut", "VOut", "stride_k_tok",
                                                   "stride_k_head", "stride_v_tok", "stride_v_head"]),
    }
    return [select, gather]
