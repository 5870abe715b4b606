"""Triton kernels for ParallelComp, installed as parallelcomp_triton.kernels.

Each family has a Triton kernel, a fast PyTorch path and a naive reference; the public functions
below choose between the first two through `dispatch.resolve_backend` (the one dispatch point).
"""
if __name__ == "kernels":
    # Imported as a top-level `kernels`: the repository root is on sys.path (`python -m`, `-c`, `-`,
    # pytest and torchrun put the working directory first), so this folder shadows the PyPI package
    # `kernels` that transformers imports. Hand the import over to that package (the import system
    # returns whatever sys.modules holds once this file has run). Done here, with no submodule import, so
    # nothing of ours is left in sys.modules under the name `kernels`.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
    _path = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
    else:
        # Not installed: become what Python makes of a stray folder without code, an empty namespace
        # package (no __file__, no version, no submodules), which transformers' availability check reads
        # as "not installed". Raising ModuleNotFoundError instead would break `import transformers` in the
        # repository root wherever transformers does not pull the package in: it finds `kernels` on
        # sys.path, finds no metadata, and imports it unguarded.
        __file__ = None
        __path__ = []
        del importlib, os, sys, _root, _path, _spec
else:
    from .dispatch import resolve_backend, triton_interpret_enabled
    from .chunk_attention import chunk_attention
    from .decode_attention import decode_attention
    from .select_kv import gather_kv, select_kv

    __all__ = ["chunk_attention", "select_kv", "gather_kv", "decode_attention", "resolve_backend",
               "triton_interpret_enabled"]
