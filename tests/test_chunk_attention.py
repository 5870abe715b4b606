"""chunk_attention against the float64 reference: Triton (interpreter on CPU) and the PyTorch path.

Tolerances follow flash-attention's tests: out may be off the float64 reference by at most twice the
error of the naive reference run in the input dtype, plus the representational floor of the dtype.
lse and scores are always computed in fp32 from the (exactly representable) inputs, so they get fixed
fp32-sized tolerances against the float64 reference of those same inputs.
"""
import importlib
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from _device import DEVICE, ON_GPU
from parallelcomp_triton.kernels.dispatch import triton_interpret_enabled

# The package re-exports the function `chunk_attention`, which shadows the submodule attribute.
ca = importlib.import_module("parallelcomp_triton.kernels.chunk_attention")

TRITON_RUNS = triton_interpret_enabled() or ON_GPU
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason="needs TRITON_INTERPRET=1"))]
PATHS = {"torch": ca.chunk_attention_torch, "triton": ca.chunk_attention_triton}

# Packed batches of (Lq, Lk): chunk prefill (Lq == Lk), question over a longer cache (Lq < Lk), and
# Lq > Lk (under causal masking the first Lq - Lk rows see no key).
LAYOUTS = {
    "square": [(1, 1), (7, 7), (64, 64), (257, 257)],
    "question": [(1, 64), (5, 113), (37, 257), (7, 7)],
    "ragged": [(113, 64), (9, 3), (1, 257), (64, 64)],
    # A question suffix over a batch of chunks: runs of equal Lq with ragged Lk (the torch path batches
    # each run, padding keys), cut where Lq changes; Lq > 64 and Lq == Lk at the end.
    "suffixes": [(5, 113), (5, 120), (5, 100), (5, 60), (1, 9), (1, 9), (37, 257), (37, 250), (65, 70), (3, 3)],
}
HEADS = [(2, 2), (3, 1), (4, 1), (8, 1), (9, 3)]
HEAD_DIMS = [64, 128]
WINDOWS = [0, 1, 8, 64]
REDUCTIONS = ["sum", "mean", "max", "none"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LSE_TOL = {torch.float32: 2e-6, torch.float16: 4e-5, torch.bfloat16: 4e-5}  # x (1 + max |lse|)


def _sweep():
    """dtype x layout x causal, with heads / head dim / window / reduction cycled so every value of
    each meets the others (5 and 2 are coprime: every (heads, d) pair appears)."""
    cases = []
    i = 0
    for dtype in DTYPES:
        for layout in LAYOUTS:
            for causal in (True, False):
                heads = HEADS[i % len(HEADS)]
                head_dim = HEAD_DIMS[i % len(HEAD_DIMS)]
                window = WINDOWS[(i // 2) % len(WINDOWS)]
                reduce = REDUCTIONS[(i // 3) % len(REDUCTIONS)]
                cases.append(pytest.param(dtype, layout, causal, heads, head_dim, window, reduce,
                                          id=f"{str(dtype)[6:]}-{layout}-{'causal' if causal else 'full'}-"
                                             f"h{heads[0]}x{heads[1]}-d{head_dim}-w{window}-{reduce}"))
                i += 1
    return cases


def _cu_seqlens(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths, dtype=torch.int64).cumsum(0)), dtype=torch.int32,
                        device=DEVICE)


def _make_inputs(pairs, heads, head_dim, dtype, seed):
    num_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    total_q = sum(lq for lq, _ in pairs)
    total_k = sum(lk for _, lk in pairs)
    q = torch.randn(total_q, num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(total_k, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(total_k, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    return q, k, v, _cu_seqlens([lq for lq, _ in pairs]), _cu_seqlens([lk for _, lk in pairs])


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels must overwrite starts as NaN."""
    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(ca, "_new_buffer", nan_buffer)


def _assert_matches_reference(result, q, k, v, cu_q, cu_k, dtype, **kw):
    out, lse, scores = result
    ref_out, ref_lse, ref_scores = ca.chunk_attention_reference(q, k, v, cu_q, cu_k, **kw)
    same_out, _, _ = ca.chunk_attention_reference(q, k, v, cu_q, cu_k, dtype=dtype, **kw)

    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "out has NaN/inf (unwritten or 0/0)"
    err = (out.double() - ref_out).abs().max().item()
    same_precision_err = (same_out.double() - ref_out).abs().max().item()
    floor = 2 * ((ref_out.to(dtype) + 0.3 - 0.3).double() - ref_out).abs().max().item() + 1e-7
    assert err <= 2 * same_precision_err + floor, f"out error {err:.3g} > 2 x {same_precision_err:.3g} + {floor:.3g}"

    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    assert not torch.isnan(lse).any()
    no_keys = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), no_keys), "lse is -inf on different rows than the reference"
    if (~no_keys).any():
        # fp32 rounding of q.k scales with the logits, so the bound scales with the largest lse.
        lse_err = (lse.double() - ref_lse)[~no_keys].abs().max().item()
        lse_bound = LSE_TOL[dtype] * (1 + ref_lse[~no_keys].abs().max().item())
        assert lse_err <= lse_bound, f"lse error {lse_err:.3g} > {lse_bound:.3g}"

    if kw.get("score_window", 0) == 0:
        assert scores is None
        return
    assert scores.dtype == torch.float32 and scores.shape == ref_scores.shape
    assert torch.isfinite(scores).all()
    if scores.numel():
        score_err = (scores.double() - ref_scores).abs().max().item()
        assert score_err <= 1e-5 * kw["score_window"], f"scores error {score_err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, layout, causal, heads, head_dim, window, reduce", _sweep())
def test_matches_reference(poisoned, backend, dtype, layout, causal, heads, head_dim, window, reduce):
    seed = zlib.crc32(f"{dtype}-{layout}-{causal}-{heads}-{head_dim}".encode())
    q, k, v, cu_q, cu_k = _make_inputs(LAYOUTS[layout], heads, head_dim, dtype, seed=seed)
    kw = dict(causal=causal, score_window=window, score_reduce=reduce)
    result = PATHS[backend](q, k, v, cu_q, cu_k, **kw)
    _assert_matches_reference(result, q, k, v, cu_q, cu_k, dtype, **kw)


def _key_mask_with_empty_rows(pairs, num_heads, seed):
    """Random exclusions (30 %) + one head of the second sequence fully excluded + the first 8 keys of
    the last sequence excluded for head 0 (its first causal rows then see nothing)."""
    total_k = sum(lk for _, lk in pairs)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(total_k, num_heads, generator=gen) < 0.3
    starts = _cu_seqlens([lk for _, lk in pairs]).tolist()
    mask[starts[1]:starts[2], num_heads - 1] = True
    mask[starts[-2]:starts[-2] + 8, 0] = True
    return mask.to(DEVICE)


KEY_MASK_CASES = [
    (torch.float32, True, (4, 1), 64, 8, "sum"),
    (torch.bfloat16, True, (9, 3), 64, 64, "none"),
    (torch.float16, False, (3, 1), 128, 1, "max"),
    (torch.bfloat16, False, (8, 1), 32, 8, "mean"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, causal, heads, head_dim, window, reduce", KEY_MASK_CASES,
                         ids=[f"{str(c[0])[6:]}-{'causal' if c[1] else 'full'}-h{c[2][0]}x{c[2][1]}-d{c[3]}-w{c[4]}-{c[5]}"
                              for c in KEY_MASK_CASES])
def test_key_mask(poisoned, backend, dtype, causal, heads, head_dim, window, reduce):
    pairs = [(7, 7), (5, 40), (33, 33)]
    q, k, v, cu_q, cu_k = _make_inputs(pairs, heads, head_dim, dtype, seed=7)
    key_mask = _key_mask_with_empty_rows(pairs, heads[0], seed=head_dim)
    kw = dict(causal=causal, score_window=window, score_reduce=reduce, key_mask=key_mask)
    out, lse, scores = PATHS[backend](q, k, v, cu_q, cu_k, **kw)
    _assert_matches_reference((out, lse, scores), q, k, v, cu_q, cu_k, dtype, **kw)
    # The fully excluded head of sequence 1: zeros, -inf, and no score anywhere; excluded keys score 0.
    q0, q1 = cu_q[1].item(), cu_q[2].item()
    assert (out[q0:q1, -1] == 0).all() and torch.isneginf(lse[q0:q1, -1]).all()
    if reduce == "none":
        assert (scores[key_mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["sum", "mean", "none"])
def test_score_sums_count_window_rows(backend, reduce):
    """Per sequence and head, scores sum over keys to the number of window rows that see a key
    (times the group size for "sum")."""
    pairs = [(3, 40), (20, 9), (9, 9), (1, 17)]  # (20, 9) causal: 11 rows see nothing
    window = 16
    q, k, v, cu_q, cu_k = _make_inputs(pairs, (6, 2), 64, torch.float32, seed=3)
    _, _, scores = PATHS[backend](q, k, v, cu_q, cu_k, causal=True, score_window=window, score_reduce=reduce)
    factor = 3 if reduce == "sum" else 1
    for b, (lq, lk) in enumerate(pairs):
        rows = range(lq - min(window, lq), lq)
        expected = sum(1 for i in rows if lk - lq + i >= 0) * factor
        per_head_sums = scores[cu_k[b]:cu_k[b + 1]].double().sum(0)
        torch.testing.assert_close(per_head_sums, torch.full_like(per_head_sums, float(expected)), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequences_and_rows(poisoned, backend):
    """Lq = 0, Lk = 0 and a head with every key excluded: zeros, -inf, zero scores, never NaN."""
    pairs = [(3, 0), (0, 5), (4, 4), (6, 2)]
    q, k, v, cu_q, cu_k = _make_inputs(pairs, (4, 2), 64, torch.float32, seed=11)
    key_mask = torch.zeros(k.shape[0], 4, dtype=torch.bool, device=DEVICE)
    key_mask[:, 1] = True
    kw = dict(causal=True, score_window=8, score_reduce="none", key_mask=key_mask)
    out, lse, scores = PATHS[backend](q, k, v, cu_q, cu_k, **kw)
    _assert_matches_reference((out, lse, scores), q, k, v, cu_q, cu_k, torch.float32, **kw)
    assert (out[:3] == 0).all() and torch.isneginf(lse[:3]).all()      # Lk = 0
    assert (out[:, 1] == 0).all() and torch.isneginf(lse[:, 1]).all()  # head 1 sees nothing
    assert (scores[:5] == 0).all() and (scores[:, 1] == 0).all()        # Lq = 0, excluded head


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_views(poisoned, backend):
    """q sliced out of a packed projection, k head-major storage, v sliced from a packed kv buffer,
    key_mask a transposed view, sm_scale given."""
    pairs = [(5, 5), (70, 70), (3, 30)]
    num_heads, num_kv_heads, head_dim = 4, 2, 64
    total_q, total_k = sum(lq for lq, _ in pairs), sum(lk for _, lk in pairs)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(total_q, num_heads + 3, head_dim, generator=gen).to(DEVICE, torch.bfloat16)[:, 1:num_heads + 1]
    k = torch.randn(num_kv_heads, total_k, head_dim, generator=gen).to(DEVICE, torch.bfloat16).transpose(0, 1)
    v = torch.randn(total_k, 2 * num_kv_heads, head_dim, generator=gen).to(DEVICE, torch.bfloat16)[:, num_kv_heads:]
    key_mask = (torch.rand(num_heads, total_k, generator=gen) < 0.2).to(DEVICE).t()
    assert not any(t.is_contiguous() for t in (q, k, v, key_mask))
    cu_q, cu_k = _cu_seqlens([lq for lq, _ in pairs]), _cu_seqlens([lk for _, lk in pairs])
    kw = dict(causal=True, score_window=8, score_reduce="max", key_mask=key_mask, sm_scale=0.3)
    result = PATHS[backend](q, k, v, cu_q, cu_k, **kw)
    _assert_matches_reference(result, q, k, v, cu_q, cu_k, torch.bfloat16, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaky_softmax(poisoned, backend):
    """Large logits (|s| in the hundreds): no exp overflow in either sweep, window wider than some Lq."""
    pairs = [(3, 3), (20, 50), (70, 66)]
    q, k, v, cu_q, cu_k = _make_inputs(pairs, (4, 2), 64, torch.float32, seed=9)
    key_mask = _key_mask_with_empty_rows(pairs, 4, seed=1)
    kw = dict(causal=True, score_window=24, score_reduce="none", key_mask=key_mask, sm_scale=4.0)
    result = PATHS[backend](q, k, v, cu_q, cu_k, **kw)
    _assert_matches_reference(result, q, k, v, cu_q, cu_k, torch.float32, **kw)


@pytest.mark.parametrize("layout", ["square", "question", "ragged", "suffixes"])
def test_torch_path_small_blocks_and_sdpa_fallback(poisoned, monkeypatch, layout):
    """The row / KV-head blocking and the public-SDPA fallback (no CPU flash op) give the same results."""
    monkeypatch.setattr(ca, "_TORCH_BLOCK_ELEMENTS", 3000)
    monkeypatch.setattr(ca, "_CPU_FLASH_WITH_LSE", None)
    q, k, v, cu_q, cu_k = _make_inputs(LAYOUTS[layout], (9, 3), 64, torch.float32, seed=2)
    key_mask = _key_mask_with_empty_rows(LAYOUTS[layout], 9, seed=4) if layout == "question" else None
    kw = dict(causal=True, score_window=8, score_reduce="sum", key_mask=key_mask)
    _assert_matches_reference(ca.chunk_attention_torch(q, k, v, cu_q, cu_k, **kw), q, k, v, cu_q, cu_k,
                              torch.float32, **kw)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU dispatch")
def test_dispatch_and_return_lse():
    q, k, v, cu_q, cu_k = _make_inputs([(4, 9)], (2, 1), 64, torch.float32, seed=1)
    out, lse, scores = ca.chunk_attention(q, k, v, cu_q, cu_k, return_lse=False)  # auto -> torch on CPU
    assert lse is None and scores is None
    torch.testing.assert_close(out, ca.chunk_attention(q, k, v, cu_q, cu_k, backend="torch")[0])
    if TRITON_RUNS:
        out_t, lse_t, _ = ca.chunk_attention(q, k, v, cu_q, cu_k, return_lse=False, backend="triton")
        assert lse_t is not None  # the Triton path always returns lse
        torch.testing.assert_close(out_t, out, atol=1e-5, rtol=1e-5)


def _bad_calls():
    q, k, v, cu_q, cu_k = _make_inputs([(4, 9), (2, 2)], (4, 2), 64, torch.float32, seed=0)
    base = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    cu = lambda values: torch.tensor(values, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return [
        ("q 2-D", dict(base, q=q[:, 0]), "3-D"),
        ("dtype", dict(base, q=q.double(), k=k.double(), v=v.double()), "not supported"),
        ("mixed dtypes", dict(base, k=k.half()), "dtypes differ"),
        ("head dim", dict(base, k=k[..., :32], v=v[..., :32]), "head dims differ"),
        ("group", dict(base, q=q[:, :3]), "multiple of KV heads"),
        ("k/v shape", dict(base, v=v[:, :1]), "shapes differ"),
        ("cu dtype", dict(base, cu_seqlens_q=cu_q.long()), "int32"),
        ("cu total", dict(base, cu_seqlens_q=cu([0, 4, 5])), "rise from 0 to 6"),
        ("cu falling", dict(base, cu_seqlens_k=cu([0, 12, 11])), "rise"),
        ("cu count", dict(base, cu_seqlens_k=cu([0, 11])), "entries"),
        ("window", dict(base, score_window=-1), "score_window"),
        ("reduce", dict(base, score_window=8, score_reduce="median"), "score_reduce"),
        ("mask dtype", dict(base, key_mask=torch.zeros(11, 4)), "key_mask"),
        ("mask shape", dict(base, key_mask=torch.zeros(11, 2, dtype=torch.bool)), "key_mask"),
        ("backend", dict(base, backend="cuda"), "unknown backend"),
    ]


@pytest.mark.parametrize("name, kwargs, match", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        ca.chunk_attention(**kwargs)
    assert "\n" not in str(info.value)


def test_triton_rejects_odd_head_dim():
    if not TRITON_RUNS:
        pytest.skip("needs TRITON_INTERPRET=1")
    q, k, v, cu_q, cu_k = _make_inputs([(4, 9)], (2, 1), 80, torch.float32, seed=0)
    with pytest.raises(ValueError, match="power-of-2 head dim"):
        ca.chunk_attention(q, k, v, cu_q, cu_k, backend="triton")
    # the torch path takes any head dim
    _assert_matches_reference(ca.chunk_attention(q, k, v, cu_q, cu_k, score_window=4, backend="torch"), q, k, v,
                              cu_q, cu_k, torch.float32, score_window=4)


def test_aot_compiles_for_sm80_and_sm90():
    """The specs aot_specs hands to the report compile for A100 and H100 within their shared memory
    (a subprocess: TRITON_INTERPRET must be unset for a real compile)."""
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from parallelcomp_triton.kernels.chunk_attention import aot_specs
        limits = {80: 166912, 90: 232448}
        for arch, limit in limits.items():
            for spec in aot_specs("bf16", 128)[:1]:  # causal, no key_mask: the chunk-prefill kernel
                kernel = triton.compile(
                    ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                              attrs=spec["attrs"]),
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
                assert kernel.asm["cubin"], spec["kernel"]
                assert kernel.metadata.shared <= limit, (spec["kernel"], arch, kernel.metadata.shared)
                print(arch, spec["kernel"], kernel.metadata.shared)
    """)
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\n") == 2
