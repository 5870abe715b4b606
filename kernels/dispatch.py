"""Where the kernels run: the one dispatch point between the Triton kernels and the PyTorch CPU path.

"auto" picks Triton for CUDA tensors and the PyTorch path for CPU tensors. "triton" on CPU tensors
needs Triton's interpreter (TRITON_INTERPRET=1 set before the kernels are imported).
"""
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "no", "off")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Return "triton" or "torch" for tensors on `device`."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpret_enabled():
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
    return backend
