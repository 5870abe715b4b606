"""A follow-up answer's time with the question-suffix scoring of another commit, side by side in one process.

    python benchmarks/followup_ab.py --tokens 128000 --base ba2bb45 --repeats 3 --out benchmarks/results/followup_ab.json

Encodes a NIAH document once (the case `followup.py` uses; `--encoding DIR` keeps and reuses it), then answers
its question from the encoding, alternating four variants: `score.score_chunks` and chunk_attention's batched
few-row CPU path (`_torch_few_rows_batched`) each from `--base` (read with `git show`) or from the working
tree. Reports the median seconds per variant and whether every variant gave the same tokens; never asserts.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _followup_case import niah_encoding, parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_at(rev: str, path: str, name: str):
    """The file `path` as it was at commit `rev`, imported as module `name` (relative imports resolve in the
    installed package: `name` is dotted under it)."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True)
    folder = tempfile.mkdtemp(prefix="followup-ab-")
    file = os.path.join(folder, os.path.basename(path))
    with open(file, "w") as f:
        f.write(source.stdout)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--base", required=True, help="commit whose scoring is compared with the working tree's")
    p.add_argument("--out", default="results/followup_ab.json")
    args = p.parse_args()

    import parallelcomp_triton.pipeline as pipeline
    import parallelcomp_triton.score as score

    ca = importlib.import_module("parallelcomp_triton.kernels.chunk_attention")
    old_score = module_at(args.base, "parallelcomp_triton/score.py", "parallelcomp_triton._score_base")
    old_ca = module_at(args.base, "kernels/chunk_attention.py", "parallelcomp_triton.kernels._chunk_attention_base")
    old_score_chunks = old_score.score_chunks
    if "defer" not in inspect.signature(old_score_chunks).parameters:
        # Before f168b11 score_chunks compressed every chunk itself; the pipeline's `compress` of the kept
        # chunks then finds nothing pending.
        def old_score_chunks(*a, defer=False, _f=old_score.score_chunks, **k):
            return _f(*a, **k)
    variants = {"base": (old_score_chunks, old_ca._torch_few_rows_batched),
                "few-row path only": (old_score_chunks, ca._torch_few_rows_batched),
                "score_chunks only": (score.score_chunks, old_ca._torch_few_rows_batched),
                "working tree": (score.score_chunks, ca._torch_few_rows_batched)}

    pc, cfg, case, encoded = niah_encoding(args.tokens, args.encoding, "followup-ab-")
    times = {v: [] for v in variants}
    answers = set()
    restore = pipeline.score_chunks, ca._torch_few_rows_batched
    try:
        pc.generate(encoded, case.question, config=cfg)  # page the encoding in
        for rep in range(args.repeats):
            for name, (score_fn, few_rows_fn) in variants.items():
                pipeline.score_chunks, ca._torch_few_rows_batched = score_fn, few_rows_fn
                t = time.perf_counter()
                answers.add(tuple(pc.generate(encoded, case.question, config=cfg).token_ids))
                times[name].append(time.perf_counter() - t)
            print(f"repeat {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr,
                  flush=True)
    finally:
        pipeline.score_chunks, ca._torch_few_rows_batched = restore
    medians = {k: statistics.median(v) for k, v in times.items()}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"tokens": args.tokens, "base": args.base, "times": times, "medians": medians,
                   "same_answer": len(answers) == 1}, f, indent=1)
    print("| variant | encoded answer s (median) | vs base |")
    print("|---|---:|---:|")
    for k, v in medians.items():
        print(f"| {k} | {v:.2f} | {medians['base'] / v:.2f}x |")
    print(f"same answer in every variant: {len(answers) == 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
