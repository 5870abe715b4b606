"""Which floating-point precision a run uses when the caller says "auto" (the default).

bfloat16 where the hardware computes it natively: CPUs with AVX512-BF16 or AMX-BF16 (oneDNN runs torch's
bf16 GEMMs there 2-3x faster than float32 on the model's shapes; BENCHMARKS.md, "bf16 by default"), and
CUDA GPUs that support bf16 (Ampere and later). float32 everywhere else: a CPU without those instructions
emulates bf16 and runs it slower than float32.
"""
from __future__ import annotations

import functools

import torch

from .loading import parse_dtype

AUTO = "auto"


@functools.lru_cache(maxsize=1)
def cpu_bf16_features() -> tuple[str, ...]:
    """The native-bf16 features of this CPU ('avx512_bf16', 'amx_bf16'); empty if it has none."""
    found = []
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    for name, probe in probes.items():
        fn = getattr(torch.cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    found.append(name)
                continue
            except Exception:  # a torch build without the probe's backing code: read the flags instead
                pass
        if name in _proc_cpuinfo_flags():
            found.append(name)
    return tuple(found)


@functools.lru_cache(maxsize=1)
def _proc_cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: str | torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_bf16_features())
    return False


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> tuple[torch.dtype, str]:
    """(dtype, why): "auto" (or None) picks bfloat16 where `device` computes it natively, else float32;
    anything else is parsed as an explicit choice."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == AUTO):
        device = torch.device(device)
        if native_bf16(device):
            why = ", ".join(cpu_bf16_features()) if device.type == "cpu" else torch.cuda.get_device_name(device)
            return torch.bfloat16, f"auto: native bf16 ({why})"
        return torch.float32, f"auto: no native bf16 on {device.type}"
    return parse_dtype(dtype), "explicit"
