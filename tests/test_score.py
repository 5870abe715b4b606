"""score_chunks (the question-dependent stage) against its definition: for every layer and chunk, the kept
positions are select_kv_reference of that chunk's window scores, and the compressed K/V are the chunk's
full K/V at those positions, head by head (also for a chunk shorter than the budget)."""
import pytest
import torch

from parallelcomp_triton.encode import encode_chunks
from parallelcomp_triton.kernels.select_kv import select_kv_reference
from parallelcomp_triton.score import ScoreItem, score_chunks
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
