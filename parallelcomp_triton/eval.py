"""Alias of parallelcomp_triton.evaluate: `python -m parallelcomp_triton.eval ...` runs its command line."""
import sys

from .evaluate import main

if __name__ == "__main__":
    sys.exit(main())
