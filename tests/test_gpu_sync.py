"""On a GPU, a forward never waits for the GPU: one prefill batch (the chunks' encoding pass), the question
pass and one decode step run under torch.cuda.set_sync_debug_mode("error"), where any host read of device
values raises. Host waits add launch and GPU time together instead of overlapping them.

GPU only: PCT_TEST_DEVICE=cuda on a machine with CUDA (`bash benchmarks/gpu_run.sh check`)."""
import contextlib
import copy
import os

import pytest
import torch

from _tiny_pipeline import tiny_pc

from parallelcomp_triton import ParallelCompConfig
from parallelcomp_triton.answer import question_pass
from parallelcomp_triton.cache import CompressedKVCache
from parallelcomp_triton.encode import encode_chunks
from parallelcomp_triton.kernels.decode_attention import decode_attention
from parallelcomp_triton.stats import Stats
from parallelcomp_triton.transfer import to_device

ON_CUDA = os.environ.get("PCT_TEST_DEVICE", "cpu").startswith("cuda") and torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not ON_CUDA, reason="GPU only: PCT_TEST_DEVICE=cuda on a machine with CUDA")


@contextlib.contextmanager
def no_host_waits():
    torch.cuda.synchronize()  # what came before may wait; inside, nothing may
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def model():
    model = copy.deepcopy(tiny_pc(dtype=torch.bfloat16).model).cuda()
    model.backend = "auto"
    return model


def test_prefill_batch_question_pass_and_decode_step_never_wait(model):
    a = model.args
    seqs = [([1, 2, 3], list(range(10, 10 + n))) for n in (97, 64, 130)]
    with torch.no_grad():
        encode_chunks(model, seqs, [True, False, False])  # compile and warm the kernels first
        with no_host_waits():
            kvs, prefixes = encode_chunks(model, seqs, [True, False, False])

        cache = CompressedKVCache(a.num_layers, 2, a.num_kv_heads, a.num_heads, a.head_dim, 400, torch.bfloat16,
                                  torch.device("cuda"))
        for row in range(2):
            cache.fill_row(row, prefixes[0][0], prefixes[0][1], [])
        suffix = list(range(40, 52))
        cfg = ParallelCompConfig()
        question_pass(model, cfg, cache, 1, suffix, 200, Stats())  # warm
        cache.lengths[1] = 3
        with no_host_waits():
            question_pass(model, cfg, cache, 1, suffix, 200, Stats())

        rows = torch.arange(2, device="cuda")
        at = to_device(cache.lengths, torch.long, "cuda")
        pos = to_device([300, 301], torch.long, "cuda")
        tokens = to_device([5, 6], torch.long, "cuda")
        lens = (at + 1).to(torch.int32)

        def attend(layer, q, k, v):
            cache.append_tokens(layer, rows, at, k, v)
            return decode_attention(q, cache.keys[layer], cache.values[layer], lens, key_mask=cache.key_mask[layer])

        model(tokens, pos, attend)  # warm
        with no_host_waits():
            hidden = model(tokens, pos, attend)
            model.lm_head_rows(hidden).argmax(-1)
    assert all(kv.keys[0].is_cuda for kv in kvs)
