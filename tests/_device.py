"""Where the kernel tests put their tensors.

PCT_TEST_DEVICE=cuda runs test_chunk_attention, test_decode_attention and test_select_kv on a GPU, with the
Triton kernels compiled for it (conftest then leaves TRITON_INTERPRET unset); the default, cpu, runs the
kernels under Triton's interpreter. Inputs are drawn on the CPU from seeded generators and then moved, so
both devices see the same numbers.
"""
import os

import torch

DEVICE = torch.device(os.environ.get("PCT_TEST_DEVICE", "cpu"))
ON_GPU = DEVICE.type == "cuda"
