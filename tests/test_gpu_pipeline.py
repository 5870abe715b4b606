"""The pipeline on a GPU, with the Triton kernels compiled for it, answers as the CPU path (PyTorch) does.

GPU only: runs with PCT_TEST_DEVICE=cuda on a machine with CUDA (`bash benchmarks/gpu_run.sh check`), skipped
elsewhere. The tiny random Llama of the tests in float32, once on the CPU and once moved to the GPU, over the
shared equivalence cases (tests/_cases.py): the GPU must give the same tokens, the same kept chunks and KV
positions, and chunk NLLs within 1e-4 (the float32 kernels use IEEE dots, not tf32), fresh, from an encoding
and in `generate_batch`.
"""
import copy
import os

import pytest
import torch

from _cases import CASES, assert_same, pairs, params
from _tiny_pipeline import tiny_pc

from parallelcomp_triton import ParallelComp

ON_CUDA = os.environ.get("PCT_TEST_DEVICE", "cpu").startswith("cuda") and torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not ON_CUDA, reason="GPU only: PCT_TEST_DEVICE=cuda on a machine with CUDA")


@pytest.fixture(scope="module")
def cpu():
    return tiny_pc()


@pytest.fixture(scope="module")
def gpu(cpu):
    model = copy.deepcopy(cpu.model).cuda()
    model.backend = "auto"  # the Triton kernels on CUDA tensors
    return ParallelComp(model, cpu.tokenizer, "tiny (cuda)")


@pytest.mark.parametrize("case", params(CASES))
def test_fresh_and_encoded_answers_on_the_gpu_equal_the_cpu(cpu, gpu, case):
    want = cpu.generate(case.context, case.question, config=case.config)
    assert_same(gpu.generate(case.context, case.question, config=case.config), want, exact_nll=False)
    with gpu.encode(case.context, case.config) as encoded:
        assert_same(gpu.generate(encoded, case.question, config=case.config), want, exact_nll=False)


@pytest.mark.parametrize("case", params(CASES))
def test_generate_batch_on_the_gpu_equals_the_cpu(cpu, gpu, case):
    batch = pairs(case)
    for (context, question), got in zip(batch, gpu.generate_batch(batch, config=case.config)):
        assert_same(got, cpu.generate(context, question, config=case.config), exact_nll=False)
