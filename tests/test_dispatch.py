"""The dispatch point's choices: tuning tables (kernels/tuned/<arch>.json), the SDPA faces it may take
instead of a Triton kernel, and lengths passed from the host instead of read back from the device."""
import json

import pytest
import torch

from _device import DEVICE

from parallelcomp_triton.kernels import tuning
from parallelcomp_triton.kernels.chunk_attention import (chunk_attention, chunk_attention_reference,
                                                         chunk_attention_sdpa, sdpa_can_run)
from parallelcomp_triton.kernels.decode_attention import (split_plan, decode_attention, decode_attention_reference,
                                                          decode_attention_sdpa, decode_attention_triton)

ENTRIES = [
    {"kernel": "chunk_attention", "dtype": "bf16", "head_dim": 128, "group": 4, "window": False, "bucket": 2048,
     "config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, "use": "sdpa"},
    {"kernel": "chunk_attention", "dtype": "bf16", "head_dim": 128, "group": 4, "window": False, "bucket": 8192,
     "config": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}, "use": "triton"},
    {"kernel": "chunk_attention", "dtype": "bf16", "head_dim": 128, "group": 4, "window": True, "bucket": 8192,
     "config": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, "use": "triton"},
]


@pytest.fixture
def table_dir(tmp_path):
    (tmp_path / "sm_90.json").write_text(json.dumps({"arch": "sm_90", "entries": ENTRIES}))
    (tmp_path / "sm_80.json").write_text("{not json")
    tuning.load_table.cache_clear()
    yield tmp_path
    tuning.load_table.cache_clear()


@pytest.mark.parametrize("size,window,want", [(2048, False, 0), (1500, False, 0), (3000, False, 0),
                                              (6000, False, 1), (100_000, False, 1), (512, True, 2)])
def test_lookup_takes_the_nearest_bucket_of_the_shape_class(table_dir, size, window, want):
    entries = tuning.load_table("sm_90", str(table_dir))
    got = tuning.lookup(entries, "chunk_attention", size, dtype="bf16", head_dim=128, group=4, window=window)
    assert got == ENTRIES[want]


def test_no_table_or_no_class_means_the_defaults(table_dir):
    assert tuning.load_table("sm_80", str(table_dir)) == ()  # unreadable: defaults, no error
    assert tuning.load_table("sm_75", str(table_dir)) == ()  # missing
    assert tuning.load_table(None) == ()                    # CPU
    entries = tuning.load_table("sm_90", str(table_dir))
    assert tuning.lookup(entries, "chunk_attention", 4096, dtype="bf16", head_dim=64, group=4, window=False) is None
    assert tuning.lookup(entries, "decode_attention", 4096, dtype="bf16", head_dim=128) is None
    assert tuning.device_arch("cpu") is None and tuning.tuned("cpu", "chunk_attention", 4096) is None


def test_report_lists_the_tables_choices(table_dir):
    from parallelcomp_triton.kernels.report import tuned_rows

    rows = tuned_rows(table_dir)
    assert [r["use"] for r in rows] == ["sdpa", "triton", "triton"] and all(r["arch"] == "sm_90" for r in rows)
    assert "SDPA" in rows[0]["note"] and "note" not in rows[1]


def _varlen(lens_q, lens_k, heads=4, kv_heads=2, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), heads, d, generator=g, dtype=dtype)
    k = torch.randn(sum(lens_k), kv_heads, d, generator=g, dtype=dtype)
    v = torch.randn(sum(lens_k), kv_heads, d, generator=g, dtype=dtype)
    bq, bk = [0], [0]
    for a, b in zip(lens_q, lens_k):
        bq.append(bq[-1] + a)
        bk.append(bk[-1] + b)
    cu_q, cu_k = torch.tensor(bq, dtype=torch.int32), torch.tensor(bk, dtype=torch.int32)
    return q, k, v, cu_q, cu_k, bq, bk


@pytest.mark.parametrize("causal,lens", [(True, [37, 1, 64]), (False, [5, 70])])
def test_sdpa_face_equals_the_reference(causal, lens):
    lens_k = lens if causal else [n + 9 for n in lens]
    q, k, v, cu_q, cu_k, bq, bk = _varlen(lens, lens_k)
    out, lse, scores = chunk_attention_sdpa(q, k, v, cu_q, cu_k, causal=causal, bounds_q=bq, bounds_k=bk)
    want, _, _ = chunk_attention_reference(q, k, v, cu_q, cu_k, causal=causal)
    assert lse is None and scores is None
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_sdpa_runs_only_what_it_computes_alike():
    bq, bk = [0, 4, 10], [0, 4, 10]
    assert sdpa_can_run(bq, bk, True, 0, None, False)
    assert not sdpa_can_run(bq, [0, 6, 12], True, 0, None, False)  # bottom-right causal: not SDPA's mask
    assert sdpa_can_run(bq, [0, 6, 12], False, 0, None, False)
    assert not sdpa_can_run(bq, bk, True, 8, None, False)          # window scores
    assert not sdpa_can_run(bq, bk, True, 0, torch.zeros(10, 4, dtype=torch.bool), False)
    assert not sdpa_can_run(bq, bk, True, 0, None, True)           # lse


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_host_bounds_give_the_same_answer_and_must_match_in_length(backend):
    q, k, v, cu_q, cu_k, bq, bk = _varlen([3, 8], [20, 8])
    q, k, v, cu_q, cu_k = (t.to(DEVICE) for t in (q, k, v, cu_q, cu_k))
    want = chunk_attention(q, k, v, cu_q, cu_k, causal=True, score_window=2, backend=backend)
    got = chunk_attention(q, k, v, cu_q, cu_k, causal=True, score_window=2, backend=backend, bounds_q=bq,
                          bounds_k=bk)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="bounds_q"):
        chunk_attention(q, k, v, cu_q, cu_k, backend=backend, bounds_q=bq[:-1], bounds_k=bk)


@pytest.mark.parametrize("capacity,programs,want", [(4096, (8 * 3, 264), 11), (4096, (64 * 8, 264), 1),
                                                    (300, (3, 264), 2), (32768, (3, 264), 64), (100, None, 1),
                                                    (4096, None, 16)])
def test_split_count_fills_the_gpu_and_no_more(capacity, programs, want):
    split_size, splits = split_plan(capacity, 64, None, programs)
    assert splits == want and split_size % 64 == 0 and split_size * splits >= capacity


@pytest.mark.parametrize("splits", [1, 3])
def test_one_split_writes_the_output_directly_and_equals_many(splits):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 64, generator=g)
    k = torch.randn(2, 2, 200, 64, generator=g)
    v = torch.randn(2, 2, 200, 64, generator=g)
    lens = torch.tensor([200, 77], dtype=torch.int32)
    q, k, v, lens = (t.to(DEVICE) for t in (q, k, v, lens))
    out = torch.full_like(q, float("nan"))
    decode_attention_triton(q, k, v, lens, num_splits=splits, out=out)
    want = decode_attention_reference(q.double(), k.double(), v.double(), lens)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


def test_decode_sdpa_face_equals_the_reference():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 8, 64, generator=g)
    k = torch.randn(3, 2, 50, 64, generator=g)
    v = torch.randn(3, 2, 50, 64, generator=g)
    lens = torch.tensor([50, 9, 0], dtype=torch.int32)
    mask = torch.rand(3, 8, 50, generator=g) < 0.3
    got = decode_attention_sdpa(q, k, v, lens, key_mask=mask)
    want = decode_attention_reference(q.double(), k.double(), v.double(), lens, key_mask=mask)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2], torch.zeros_like(got[2]))  # no visible key: zero, never NaN
    assert torch.equal(decode_attention(q, k, v, lens, key_mask=mask, backend="torch").double().isnan().any(),
                       torch.tensor(False))


@pytest.mark.parametrize("batch_chunks,batch_tokens,device,chunk_len,want", [
    (4, None, "cpu", 1024, 4), (4, None, "cuda", 1024, 16), (4, None, "cuda", 8000, 4), (20, None, "cuda", 1024, 20),
    (4, 0, "cuda", 1024, 4), (2, 4096, "cpu", 1000, 4)])
def test_prefill_batches_grow_to_the_token_target_on_cuda(batch_chunks, batch_tokens, device, chunk_len, want):
    from parallelcomp_triton import ParallelCompConfig
    from parallelcomp_triton.encode import chunks_per_batch

    cfg = ParallelCompConfig(batch_chunks=batch_chunks, batch_tokens=batch_tokens)
    assert chunks_per_batch(cfg, torch.device(device), chunk_len) == want


def test_prefill_and_encodings_use_the_grown_batches(monkeypatch):
    import parallelcomp_triton.encode as encode_mod
    from _cases import DOCUMENTS
    from _tiny_pipeline import tiny_pc

    from parallelcomp_triton import ParallelCompConfig

    pc = tiny_pc()
    cfg = ParallelCompConfig(chunk_tokens=97, keep_chunks=2, kv_budget=16, batch_chunks=1, batch_tokens=300,
                             max_new_tokens=4, template="chat")
    sizes, real = [], encode_mod.encode_chunks
    monkeypatch.setattr(encode_mod, "encode_chunks",
                        lambda model, seqs, *a, **k: sizes.append(len(seqs)) or real(model, seqs, *a, **k))
    res = pc.generate(DOCUMENTS["d260"], "Which word comes first?", config=cfg)
    per_batch = 300 // max(e - s for s, e in res.stats.chunk_spans)
    assert per_batch > 1 and max(sizes) == per_batch
    sizes.clear()
    encoded = pc.encode(DOCUMENTS["d260"], cfg)
    assert encoded.meta["batch_chunks"] == per_batch and max(sizes) == per_batch
    assert pc.generate(encoded, "Which word comes first?", config=encoded.config(cfg)).token_ids == res.token_ids
