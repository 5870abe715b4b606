"""Alias of parallelcomp_triton.inspect_attention: `python -m parallelcomp_triton.inspect ...` runs its command
line."""
import sys

from .inspect_attention import main

if __name__ == "__main__":
    sys.exit(main())
