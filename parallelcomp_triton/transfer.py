"""Host lists to device tensors without a host wait."""
from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """`values` (a list of ints) as a tensor on `device`. On a GPU the list is staged in pinned memory and
    copied asynchronously: a plain copy from pageable memory makes the host wait for the GPU's queue, and
    a forward that does it per layer or per batch then runs launch by launch instead of overlapping."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
