"""decode_attention: the split-K Triton kernel (interpreter) and the PyTorch path against a float64
naive reference, with the FlashAttention tolerance rule:
    max|out - ref64| <= 2 * max|ref_in_dtype - ref64| + floor."""
import importlib

import pytest
import torch

from _device import DEVICE
from parallelcomp_triton.errors import ParallelCompError
from parallelcomp_triton.kernels.dispatch import triton_interpret_enabled

# The module, not the same-named function the package re-exports.
da = importlib.import_module("parallelcomp_triton.kernels.decode_attention")

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
CACHE_LEN_SETS = [[1, 257, 600], [7, 113, 600], [600, 1, 257], [113, 7, 1]]


def _inputs(batch, num_kv_heads, group, capacity, head_dim, dtype, seed, with_mask):
    gen = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * group
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, num_kv_heads, capacity, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, num_kv_heads, capacity, head_dim, generator=gen).to(dtype)
    key_mask = None
    if with_mask:
        key_mask = torch.rand(batch, num_heads, capacity, generator=gen) < 0.3
        key_mask[0, 0] = True  # a query head that sees nothing -> zeros
        key_mask[-1, -1, 1:] = True  # a query head that sees only key 0
        key_mask[0, 1, :200] = True  # whole leading key tiles hidden, later keys visible
        key_mask = key_mask.to(DEVICE)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), key_mask


def _truncate_to_bf16(x):
    return (x.float().view(torch.int32) & -65536).view(torch.float32).double()


def _check(q, k, v, cache_lens, key_mask, backend, sm_scale=None, **triton_kwargs):
    cache_lens = cache_lens.to(q.device)
    ref64 = da.decode_attention_reference(q.double(), k.double(), v.double(), cache_lens, sm_scale=sm_scale,
                                          key_mask=key_mask)
    ref_same = da.decode_attention_reference(q, k, v, cache_lens, sm_scale=sm_scale, key_mask=key_mask)
    out = torch.full_like(q, float("nan"))
    if triton_kwargs:
        got = da.decode_attention_triton(q, k, v, cache_lens, sm_scale=sm_scale, key_mask=key_mask, out=out,
                                         **triton_kwargs)
    else:
        got = da.decode_attention(q, k, v, cache_lens, sm_scale=sm_scale, key_mask=key_mask, out=out, backend=backend)
    assert got.data_ptr() == out.data_ptr() and got.dtype == q.dtype
    assert torch.isfinite(got).all(), "an output element was not written or is NaN/inf"
    err = (got.double() - ref64).abs().max().item()
    bound = 2 * (ref_same.double() - ref64).abs().max().item() + FLOOR[q.dtype]
    if backend == "triton" and q.dtype == torch.bfloat16 and triton_interpret_enabled():
        # The interpreter stores fp32 -> bf16 by truncation (up to 1 ulp, not 0.5): allow exactly that.
        bound += (_truncate_to_bf16(ref64) - ref64).abs().max().item()
    assert err <= bound, f"{backend}: max error {err:.3g} > bound {bound:.3g}"
    return got, ref64


CASES = [(dtype, group, head_dim, with_mask)
         for dtype in (torch.float32, torch.float16, torch.bfloat16)
         for group in (1, 3, 4, 8)
         for head_dim in (64, 128)
         for with_mask in (False, True)]


@pytest.mark.parametrize("dtype,group,head_dim,with_mask", CASES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decode_attention_matches_reference(backend, dtype, group, head_dim, with_mask):
    index = CASES.index((dtype, group, head_dim, with_mask))
    # Masked and unmasked cases alternate in CASES, so rotate on index // 2 to meet every length set.
    cache_lens = CACHE_LEN_SETS[(index // 2) % len(CACHE_LEN_SETS)]
    batch = 1 + (index // 2) % 3
    q, k, v, key_mask = _inputs(batch, 2, group, 600, head_dim, dtype, index, with_mask)
    got, _ = _check(q, k, v, torch.tensor(cache_lens[:batch], dtype=torch.int32), key_mask, backend)
    if with_mask:
        assert got[0, 0].eq(0).all()


@pytest.mark.parametrize("num_splits,block_n", [(1, 128), (5, 64), (40, 16)])
def test_decode_attention_split_counts(num_splits, block_n):
    """One split, several, and more splits than a short cache fills (empty splits must weigh 0)."""
    q, k, v, key_mask = _inputs(3, 2, 4, 300, 64, torch.float32, num_splits, True)
    _check(q, k, v, torch.tensor([300, 17, 129], dtype=torch.int32), key_mask, "triton",
           num_splits=num_splits, block_n=block_n)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decode_attention_empty_and_overlong_cache(backend):
    """cache_len 0 gives zeros; a cache_len above the capacity counts as the capacity."""
    q, k, v, _ = _inputs(3, 1, 3, 70, 64, torch.float16, 5, False)
    for t in (q, k, v):
        t[2] = t[1]
    got, _ = _check(q, k, v, torch.tensor([0, 70, 999], dtype=torch.int32), None, backend, sm_scale=0.3)
    assert got[0].eq(0).all()
    assert torch.equal(got[1], got[2])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decode_attention_strided_inputs(backend):
    """q and the caches as views with unusual strides (a fused QKV buffer, a cache sliced on capacity)."""
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(2, 3 * 8, 64, generator=gen, dtype=torch.float32).to(DEVICE)
    q = qkv[:, :8]
    cache = torch.randn(2, 2, 2, 200, 64, generator=gen).to(DEVICE)
    k, v = cache[:, 0, :, :150], cache[:, 1, :, :150]
    _check(q, k, v, torch.tensor([150, 33], dtype=torch.int32), None, backend)


def test_decode_attention_large_scores_stay_finite():
    """Scores far beyond exp range: the running max must keep exp2 finite across splits."""
    q, k, v, _ = _inputs(1, 1, 4, 600, 64, torch.float32, 2, False)
    k[0, 0, 400] = q[0, 0] * 40.0
    _check(q, k, v, torch.tensor([600], dtype=torch.int32), None, "triton")


@pytest.mark.parametrize("bad,match", [
    ({"q": torch.zeros(2, 6, 64)}, "multiple"),
    ({"cache_lens": torch.zeros(2, dtype=torch.int64)}, "cache_lens"),
    ({"key_mask": torch.zeros(2, 4, 10, dtype=torch.bool)}, "key_mask"),
    ({"k_cache": torch.zeros(2, 4, 10, 64, dtype=torch.float16)}, "dtype|k/v|cache"),
])
def test_decode_attention_rejects_bad_input(bad, match):
    args = {"q": torch.zeros(2, 8, 64), "k_cache": torch.zeros(2, 4, 10, 64), "v_cache": torch.zeros(2, 4, 10, 64),
            "cache_lens": torch.zeros(2, dtype=torch.int32)}
    args.update(bad)
    with pytest.raises(ParallelCompError, match=match):
        da.decode_attention(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("cache_lens"),
                            backend="torch", **args)
