"""score_chunks (the question-dependent stage) against its definition: for every layer and chunk, the kept
positions are select_kv_reference of that chunk's window scores, and the compressed K/V are the chunk's
full K/V at those positions, head by head (also for a chunk shorter than the budget)."""
import pytest
import torch

from parallelcomp_triton.encode import encode_chunks
from parallelcomp_triton.kernels.select_kv import select_kv_reference
from parallelcomp_triton.score import ScoreItem, compress, score_chunks
from _tiny_pipeline import tiny_pc

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Scores:
    def __init__(self):
        self.seen = {}

    def chunk_scores(self, layer, chunk, scores, kept):
        self.seen[(layer, chunk)] = (scores.clone(), None if kept is None else kept.clone())


@pytest.mark.parametrize("budget, pool_kernel", [(9, 3), (16, 1), (40, 5)])
def test_kept_kv_is_the_chunks_kv_at_the_reference_selection(budget, pool_kernel):
    pc = tiny_pc(seed=2, layers=3, heads=6, kv_heads=2)
    gen = torch.Generator().manual_seed(budget)
    vocab = pc.args.vocab_size
    prefix = torch.randint(10, vocab, (5,), generator=gen).tolist()
    chunks = [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in (31, 12, 57)]  # 12 < budget 16
    suffix = torch.randint(10, vocab, (7,), generator=gen).tolist()
    kvs, prefixes = encode_chunks(pc.model, [(prefix, c) for c in chunks], [True, False, False], backend="torch")
    pk, pv = prefixes[0]
    items = [ScoreItem(index=i, kv=kv, prefix_keys=pk, prefix_values=pv, suffix=suffix, scored=(0, len(suffix)),
                       window=4) for i, kv in enumerate(kvs)]
    seen = Scores()
    caches = score_chunks(pc.model, items, budget, pool_kernel, "max", backend="torch", observer=seen)
    assert len(seen.seen) == pc.args.num_layers * len(chunks)
    for cache, kv, n in zip(caches, kvs, (len(c) for c in chunks)):
        assert len(cache.keys) == len(cache.positions) == pc.args.num_layers
        for layer in range(pc.args.num_layers):
            scores, observed_kept = seen.seen[(layer, cache.index)]
            assert scores.shape == (n, pc.args.num_kv_heads)
            expected, _ = select_kv_reference(scores, torch.tensor([0, n], dtype=torch.int32), budget,
                                              pool_kernel=pool_kernel)
            kept = cache.positions[layer]
            assert kept.shape == (pc.args.num_kv_heads, min(budget, n))
            assert torch.equal(kept.long(), expected[0, :, :min(budget, n)].long())
            assert torch.equal(observed_kept, kept)
            for h in range(pc.args.num_kv_heads):
                assert torch.equal(cache.keys[layer][h], kv.keys[layer][h, kept[h].long()])
                assert torch.equal(cache.values[layer][h], kv.values[layer][h, kept[h].long()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_token_nll_is_the_cross_entropy_of_the_lm_head(dtype, block):
    """The vocabulary-blocked NLL (running logsumexp, the target's logit from its block) equals the cross
    entropy of the whole logits row, whatever block the vocabulary is cut into (7 leaves a ragged last one)."""
    pc = tiny_pc(seed=3, layers=1, heads=4, kv_heads=2)
    model = pc.model.to(dtype)
    gen = torch.Generator().manual_seed(block)
    vocab = pc.args.vocab_size
    hidden = torch.randn(13, pc.args.hidden_size, generator=gen).to(dtype)
    targets = torch.randint(0, vocab, (13,), generator=gen)
    targets[:2] = torch.tensor([0, vocab - 1])  # the first and last token of the vocabulary
    got = model.token_nll(hidden, targets, block=block)
    logits = model.lm_head_rows(hidden).double()
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert got.dtype == torch.float32 and got.shape == (13,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [9, 40])
def test_deferred_selection_is_the_immediate_one(budget):
    """score_chunks(defer=True) leaves each chunk's selection pending (no KV yet); compress then keeps
    exactly what score_chunks compressing at once keeps, K/V and positions, for every layer."""
    pc = tiny_pc(seed=4, layers=2, heads=6, kv_heads=3)
    gen = torch.Generator().manual_seed(budget)
    vocab = pc.args.vocab_size
    chunks = [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in (33, 20, 51)]
    suffix = torch.randint(10, vocab, (6,), generator=gen).tolist()
    kvs, _ = encode_chunks(pc.model, [([], c) for c in chunks], backend="torch")
    items = [ScoreItem(index=i, kv=kv, prefix_keys=[], prefix_values=[], suffix=suffix, scored=(0, len(suffix)),
                       window=3) for i, kv in enumerate(kvs)]
    now = score_chunks(pc.model, items, budget, 3, "sum", backend="torch")
    later = score_chunks(pc.model, items, budget, 3, "sum", backend="torch", defer=True)
    assert all(c.pending is None and c.keys for c in now)
    assert all(c.pending is not None and not c.keys for c in later)
    compress(later[1:], budget, 3, backend="torch")  # a subset, as after eviction
    assert later[0].pending is not None and not later[0].keys
    for a, b in zip(now[1:], later[1:]):
        assert b.pending is None and a.nll == b.nll
        for layer in range(pc.args.num_layers):
            assert torch.equal(a.positions[layer], b.positions[layer])
            assert torch.equal(a.keys[layer], b.keys[layer]) and torch.equal(a.values[layer], b.values[layer])


def test_pipeline_selects_kv_only_for_chunks_that_survive_eviction(monkeypatch):
    """In generate, KV selection runs for the chunks kept after each batch's eviction, not for every chunk,
    and the answer, kept chunks and kept positions are those of a run that compresses every chunk (an
    observer turns deferral off)."""
    import parallelcomp_triton.score as score
    from parallelcomp_triton import ParallelCompConfig

    pc = tiny_pc(seed=5)
    text = " ".join(f"w{i}" for i in range(700))
    cfg = ParallelCompConfig(chunk_tokens=97, keep_chunks=2, kv_budget=12, batch_chunks=3, max_new_tokens=5,
                             template="plain")
    compressed = []
    real = score.compress

    def counting(caches, *a, **k):
        compressed.extend(c.index for c in caches if c.pending is not None)
        return real(caches, *a, **k)

    monkeypatch.setattr(score, "compress", counting)
    deferred = pc.generate(text, "Which word comes first?", config=cfg)
    chunks = len(deferred.stats.chunk_spans)
    assert chunks >= 8 and len(set(compressed)) == len(compressed) < chunks

    class Observer:
        def __getattr__(self, name):  # chunk_scores and every other hook: nothing to do
            return lambda *a, **k: None

    every = pc.generate(text, "Which word comes first?", config=cfg, observer=Observer())
    assert every.token_ids == deferred.token_ids
    assert every.stats.kept_chunks == deferred.stats.kept_chunks
    for c in deferred.kept_positions:
        assert all(torch.equal(a, b) for a, b in zip(every.kept_positions[c], deferred.kept_positions[c]))
