"""Where a follow-up answer's time goes: the stages of `generate(encoded, question)`, timed in one process.

    python benchmarks/followup_stages.py --tokens 128000 --encoding /tmp/enc128 --repeats 3

Encodes the NIAH document `followup.py` uses (or reuses `--encoding DIR`), then answers its question,
alternating the pipeline as it is (KV selection for the chunks that survive each batch's eviction) with KV
selection for every chunk (a no-op observer turns the deferral off), and reports per variant the median
total and the seconds in reading the chunks' K/V, `score_chunks`, its attention calls, its NLL and
`compress`, and how many chunks were compressed. Wraps the functions with timers; never asserts.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

from _followup_case import niah_encoding, parser


class _NoOpObserver:
    """Any observer turns the deferred KV selection off (observers see every chunk's kept positions)."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import parallelcomp_triton.pipeline as pipeline
    import parallelcomp_triton.score as score

    pc, cfg, case, encoded = niah_encoding(args.tokens, args.encoding, "followup-stages-")

    acc: dict[str, float] = {}

    def timed(fn, key, count=None):
        def wrapper(*a, **k):
            if count is not None:
                acc["chunks compressed"] = acc.get("chunks compressed", 0) + count(*a, **k)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
        return wrapper

    pipeline.score_chunks = timed(pipeline.score_chunks, "score_chunks s")
    score.chunk_attention = timed(score.chunk_attention, "  attention s")
    score.compress = timed(score.compress, "compress s",
                           count=lambda caches, *a, **k: sum(c.pending is not None for c in caches))
    pipeline.compress = score.compress
    pc.model.token_nll = timed(pc.model.token_nll, "  nll s")
    pc.chunk_kv = timed(pc.chunk_kv, "read K/V s")

    pc.generate(encoded, case.question, config=cfg)  # page the encoding in
    variants = {"selection after eviction": None, "selection for every chunk": _NoOpObserver()}
    runs = {v: [] for v in variants}
    answers = set()
    for _ in range(args.repeats):
        for name, observer in variants.items():
            acc.clear()
            t = time.perf_counter()
            answers.add(tuple(pc.generate(encoded, case.question, config=cfg, observer=observer).token_ids))
            runs[name].append(dict(acc, **{"total s": time.perf_counter() - t}))
            print(name, {k: round(v, 2) for k, v in runs[name][-1].items()}, file=sys.stderr, flush=True)
    keys = ["total s", "read K/V s", "score_chunks s", "  attention s", "  nll s", "compress s", "chunks compressed"]
    medians = {name: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in keys} for name, rs in runs.items()}
    print("| stage | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for k in keys:
        print(f"| {k.strip()} | " + " | ".join(f"{medians[v][k]:.2f}" for v in variants) + " |")
    print(f"same answer in every run: {len(answers) == 1}; medians of {args.repeats}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"tokens": args.tokens, "runs": runs, "medians": medians, "same_answer": len(answers) == 1},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
