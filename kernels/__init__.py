"""Triton kernels for ParallelComp, installed as parallelcomp_triton.kernels.

Each family has a Triton kernel, a fast PyTorch path and a naive reference; the public functions
below choose between the first two through `_backend.resolve_backend` (the one dispatch point).
"""
from ._backend import resolve_backend, triton_interpret_enabled
from .chunk_attention import chunk_attention
from .decode_attention import decode_attention
from .select_kv import gather_kv, select_kv

__all__ = ["chunk_attention", "select_kv", "gather_kv", "decode_attention", "resolve_backend",
           "triton_interpret_enabled"]
