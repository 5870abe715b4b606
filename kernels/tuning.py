"""Launch choices measured on a GPU: `kernels/tuned/<arch>.json` (e.g. sm_90.json), written by
`benchmarks/tune_gpu.py` on that GPU, read here by the launch wrappers.

Each entry names a kernel and the shape class it was timed on (dtype, head dim, and for attention whether
window rows are scored, the GQA group and a length bucket; for decoding the batch and cache buckets), the
tile config that won, and which path won against torch's SDPA timed on the same card: "triton", or "sdpa"
where the tuned kernel still lost. A shape class the table does not hold takes the nearest bucket of its
class; a GPU without a table keeps the wrappers' own defaults, so nothing changes where nothing was measured.

    {"arch": "sm_90", "device": "...", "torch": "...", "triton": "...", "commit": "...",
     "entries": [{"kernel": "chunk_attention", "dtype": "bf16", "head_dim": 128, "group": 4, "window": false,
                  "bucket": 4096, "config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
                  "use": "triton", "ms": 0.41, "sdpa_ms": 0.45}, ...]}
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

TUNED_DIR = Path(__file__).with_name("tuned")
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def device_arch(device) -> str | None:
    """"sm_90" for a CUDA device of compute capability 9.0; None elsewhere (CPU, the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def bucket(n: int, lo: int = 1, hi: int = 1 << 20) -> int:
    """The power of two nearest above n, within [lo, hi]: the length classes the tuner times."""
    return min(hi, max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


@functools.lru_cache(maxsize=None)
def load_table(arch: str | None, directory: str | None = None) -> tuple[dict, ...]:
    """The entries of `<directory>/<arch>.json` (default: kernels/tuned), or () where there is none or it is
    unreadable (the wrappers then keep their defaults)."""
    if arch is None:
        return ()
    path = Path(directory or TUNED_DIR) / f"{arch}.json"
    try:
        table = json.loads(path.read_text())
        return tuple(e for e in table.get("entries", []) if isinstance(e, dict) and "kernel" in e)
    except (OSError, ValueError, AttributeError):
        return ()


def lookup(entries, kernel: str, size: int, **key) -> dict | None:
    """The entry of `kernel` whose fields equal `key` and whose bucket is nearest `size` (log scale); None
    where no entry of that class exists."""
    best, best_distance = None, None
    for entry in entries:
        if entry.get("kernel") != kernel or any(entry.get(name) != value for name, value in key.items()):
            continue
        distance = abs(math.log2(max(entry.get("bucket", 1), 1)) - math.log2(max(size, 1)))
        if best is None or distance < best_distance:
            best, best_distance = entry, distance
    return best


def tuned(device, kernel: str, size: int, **key) -> dict | None:
    """The tuned entry for a launch on `device` (None: no table for this GPU, or no entry of this class)."""
    entries = load_table(device_arch(device))
    return lookup(entries, kernel, size, **key) if entries else None
