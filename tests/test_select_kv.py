"""select_kv / gather_kv: the Triton kernels (interpreter) and the PyTorch path must give exactly the
reference's keep indices, on random and heavily tied scores; gather must copy exactly."""
import importlib
import itertools
import zlib

import pytest
import torch

from _device import DEVICE
from parallelcomp_triton.errors import ParallelCompError

# The module, not the same-named function the package re-exports.
sk = importlib.import_module("parallelcomp_triton.kernels.select_kv")

LENS = [1, 7, 64, 113, 257, 1000]
SCORE_KINDS = ["random", "quantised", "zeros", "runs"]
BUDGETS = [1, 5, 64, 300]


def _cu(lens):
    return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=DEVICE)


def _scores(kind, total, heads, gen):
    return _scores_cpu(kind, total, heads, gen).to(DEVICE)


def _scores_cpu(kind, total, heads, gen):
    if kind == "random":
        return torch.randn(total, heads, generator=gen)
    if kind == "quantised":  # four values: ties everywhere, across pooling windows too
        return torch.randint(-2, 2, (total, heads), generator=gen).float() * 0.5
    if kind == "zeros":  # +0.0 and -0.0 must rank as equal, so only positions decide
        signs = torch.randint(0, 2, (total, heads), generator=gen).bool()
        return torch.where(signs, torch.tensor(-0.0), torch.tensor(0.0))
    if kind == "runs":  # constant runs of random length, some scores negative
        values = torch.randn(total, heads, generator=gen)
        run = torch.randint(1, 40, (total,), generator=gen)
        starts = torch.repeat_interleave(torch.arange(total), run)[:total]
        return values[starts]
    raise ValueError(kind)


def _seed(*parts):
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _poisoned_select_out(batch, heads, budget):
    return (torch.full((batch, heads, budget), -7, dtype=torch.int32, device=DEVICE),
            torch.full((batch,), -7, dtype=torch.int32, device=DEVICE))


def _check_select(scores, cu, budget, pool, protect, backends=("triton", "torch"), **triton_kwargs):
    ref_keep, ref_lens = sk.select_kv_reference(scores, cu, budget, pool_kernel=pool, protect=protect)
    batch, heads = cu.numel() - 1, scores.shape[1]
    for backend in backends:
        out = _poisoned_select_out(batch, heads, budget)
        if backend == "triton" and triton_kwargs:
            keep, keep_lens = sk.select_kv_triton(scores, cu, budget, pool_kernel=pool, protect=protect, out=out,
                                                  **triton_kwargs)
        else:
            keep, keep_lens = sk.select_kv(scores, cu, budget, pool_kernel=pool, protect=protect, out=out,
                                           backend=backend)
        assert keep.data_ptr() == out[0].data_ptr() and keep_lens.data_ptr() == out[1].data_ptr()
        assert torch.equal(keep_lens, ref_lens), backend
        mismatch = (keep != ref_keep).nonzero()
        assert mismatch.numel() == 0, \
            f"{backend}: {mismatch.shape[0]} keep entries differ, first at {mismatch[0].tolist()}"
    return ref_keep, ref_lens


def _protect(total, frac, gen):
    return (torch.rand(total, generator=gen) < frac).to(DEVICE)


# Every score kind meets every budget; heads, pooling and protection rotate through their values.
CASES = [(kind, budget, [1, 3, 8][i % 3], 7 if i % 4 != 3 else 1, i % 2 == 1)
         for i, (kind, budget) in enumerate(itertools.product(SCORE_KINDS, BUDGETS))]


@pytest.mark.parametrize("kind,budget,heads,pool,use_protect", CASES)
def test_select_kv_matches_reference(kind, budget, heads, pool, use_protect):
    gen = _seed(kind, budget, heads)
    cu = _cu(LENS)
    scores = _scores(kind, int(cu[-1]), heads, gen)
    protect = _protect(int(cu[-1]), 0.03, gen) if use_protect else None
    keep, keep_lens = _check_select(scores, cu, budget, pool, protect)
    assert keep_lens.tolist() == [min(budget, n) for n in LENS]


@pytest.mark.parametrize("kind,budget,pool,use_protect",
                         list(itertools.product(SCORE_KINDS, BUDGETS, [1, 7], [False, True])))
def test_select_kv_torch_matches_reference(kind, budget, pool, use_protect):
    gen = _seed(kind, budget, pool, use_protect)
    lens = [1, 7, 64, 113, 257]
    cu = _cu(lens)
    scores = _scores(kind, int(cu[-1]), 2, gen)
    protect = _protect(int(cu[-1]), 0.05, gen) if use_protect else None
    _check_select(scores, cu, budget, pool, protect, backends=("torch",))


@pytest.mark.parametrize("kind", ["random", "quantised"])
def test_select_kv_pool_1_vs_7(kind):
    gen = torch.Generator().manual_seed(7)
    cu = _cu(LENS)
    scores = _scores(kind, int(cu[-1]), 3, gen)
    keep1, _ = _check_select(scores, cu, 64, 1, None)
    keep7, _ = _check_select(scores, cu, 64, 7, None)
    if kind == "random":  # pooling must change which keys win
        assert not torch.equal(keep1, keep7)


def test_select_kv_protect_over_budget_keeps_lowest_protected():
    gen = torch.Generator().manual_seed(3)
    cu = _cu([113, 257])
    scores = _scores("random", 370, 3, gen)
    protect = _protect(370, 0.3, gen)
    keep, _ = _check_select(scores, cu, 5, 7, protect)
    first_protected = protect[:113].nonzero().flatten()[:5].int()
    assert torch.equal(keep[0, 0], first_protected)


def test_select_kv_all_protected_and_empty_sequence():
    gen = torch.Generator().manual_seed(4)
    cu = _cu([0, 9, 3])
    scores = _scores("random", 12, 2, gen)
    keep, keep_lens = _check_select(scores, cu, 4, 7, torch.ones(12, dtype=torch.bool, device=DEVICE))
    assert keep_lens.tolist() == [0, 4, 3]
    assert keep[0].eq(-1).all() and keep[1, 0].tolist() == [0, 1, 2, 3] and keep[2, 1].tolist() == [0, 1, 2, -1]


@pytest.mark.parametrize("kind", ["random", "runs"])
def test_select_kv_triton_multi_tile(kind):
    """Small tiles: running counts, tie ranks and output slots carry across tiles."""
    gen = torch.Generator().manual_seed(11)
    lens = [1000, 300, 7]
    cu = _cu(lens)
    scores = _scores(kind, int(cu[-1]), 1, gen)
    scores[1100:1300] = 1e4  # second sequence: the cut falls inside a tie block spanning 128-key tiles
    _check_select(scores, cu, 150, 7, _protect(int(cu[-1]), 0.01, gen), backends=("triton",), block=128)


def test_select_kv_extreme_scores():
    cu = _cu([64, 7])
    values = torch.tensor([float("-inf"), float("inf"), -3.4e38, 3.4e38, 1e-45, -1e-45, 0.0, -0.0])
    scores = values[torch.arange(71) % 8].view(71, 1).repeat(1, 2).contiguous()
    scores[:, 1] = scores[:, 1].flip(0)
    scores = scores.to(DEVICE)
    _check_select(scores, cu, 9, 1, None)
    _check_select(scores, cu, 9, 3, None)


@pytest.mark.parametrize("kwargs,match", [
    ({"budget": 0}, "budget"),
    ({"budget": 2.0}, "budget"),
    ({"pool_kernel": 4}, "pool_kernel"),
    ({"scores": torch.zeros(10, 2, dtype=torch.float16)}, "scores"),
    ({"cu_seqlens_k": torch.tensor([0, 10], dtype=torch.int64)}, "cu_seqlens_k"),
    ({"protect": torch.zeros(9, dtype=torch.bool)}, "protect"),
])
def test_select_kv_rejects_bad_input(kwargs, match):
    args = {"scores": torch.zeros(10, 2), "cu_seqlens_k": torch.tensor([0, 10], dtype=torch.int32), "budget": 3}
    args.update(kwargs)
    with pytest.raises(ParallelCompError, match=match):
        sk.select_kv(args.pop("scores"), args.pop("cu_seqlens_k"), args.pop("budget"), backend="torch", **args)


# --------------------------------------------------------------------------------------------------
# gather_kv
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,head_dim,heads", [
    (torch.float32, 64, 1), (torch.float16, 128, 3), (torch.bfloat16, 64, 3), (torch.bfloat16, 128, 8),
])
@pytest.mark.parametrize("layout", ["contiguous", "fused", "head_major"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gather_kv_exact(dtype, head_dim, heads, backend, layout):
    gen = torch.Generator().manual_seed(head_dim + heads)
    lens = [1, 7, 113, 257]
    cu = _cu(lens)
    total = int(cu[-1])
    scores = _scores("random", total, heads, gen)
    keep, keep_lens = sk.select_kv_reference(scores, cu, 100, pool_kernel=7)
    if layout == "fused":  # K and V as strided views into one [total, 2 * H_kv, d] buffer (a fused projection)
        kv = torch.randn(total, 2 * heads, head_dim, generator=gen).to(DEVICE, dtype)
        k, v = kv[:, :heads], kv[:, heads:]
    elif layout == "contiguous":
        k, v = (torch.randn(total, heads, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    else:  # [H_kv, total, d] storage seen as [total, H_kv, d] (how score_chunks packs stored chunk K/V)
        k, v = (torch.randn(heads, total, head_dim, generator=gen).to(DEVICE, dtype).transpose(0, 1)
                for _ in range(2))
    ref_k, ref_v = sk.gather_kv_reference(k, v, cu, keep)
    out = tuple(torch.full((len(lens), heads, 100, head_dim), float("nan"), dtype=dtype, device=DEVICE)
                for _ in range(2))
    k_c, v_c = sk.gather_kv(k, v, cu, keep, out=out, backend=backend)
    assert k_c.data_ptr() == out[0].data_ptr() and v_c.data_ptr() == out[1].data_ptr()
    assert torch.isfinite(k_c).all() and torch.isfinite(v_c).all()
    assert torch.equal(k_c, ref_k) and torch.equal(v_c, ref_v)
    assert k_c[0, :, 1:].eq(0).all()  # the length-1 sequence keeps one row; the rest is zero
    for b, n in enumerate(keep_lens.tolist()):
        assert torch.equal(k_c[b, 0, :n], k[cu[b] + keep[b, 0, :n].long(), 0])


def test_gather_kv_rejects_bad_keep():
    k = torch.zeros(10, 2, 64)
    with pytest.raises(ParallelCompError, match="keep"):
        sk.gather_kv(k, k, torch.tensor([0, 10], dtype=torch.int32), torch.zeros(1, 3, 4, dtype=torch.int32))
