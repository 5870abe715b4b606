"""A follow-up answer from an encoding the page cache no longer holds, with and without the read-ahead.

    python benchmarks/followup_cold.py --tokens 128000 --encoding /tmp/enc128 --repeats 3

Encodes the NIAH document `followup.py` uses (or reuses `--encoding DIR`), then answers its question from the
encoding, alternating four variants: the encoding cached ("warm") or its chunk files just dropped from the
page cache with POSIX_FADV_DONTNEED ("cold": as after a reboot, or once the OS has reclaimed the pages of an
encoding left idle), each with the pipeline's read-ahead (the next batch's chunk files read on a background
thread, `encode.read_ahead`) or with it off. Reports per variant the median wall time, the process's
CPU time (all threads: the read-ahead thread's reads included) and major page faults, and whether every
variant gave the same tokens; never asserts.
"""
from __future__ import annotations

import glob
import json
import os
import resource
import statistics
import sys
import time

from _followup_case import niah_encoding, parser


def drop_from_page_cache(path: str) -> None:
    for f in glob.glob(os.path.join(path, "chunk_*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import parallelcomp_triton.pipeline as pipeline

    pc, cfg, case, encoded = niah_encoding(args.tokens, args.encoding, "followup-cold-")
    path = str(encoded.path)
    read_ahead = pipeline.read_ahead

    pc.generate(encoded, case.question, config=cfg)  # page the encoding in
    variants = [("warm, read-ahead", False, True), ("warm, no read-ahead", False, False),
                ("cold, read-ahead", True, True), ("cold, no read-ahead", True, False)]
    runs = {name: [] for name, _, _ in variants}
    answers = set()
    try:
        for _ in range(args.repeats):
            for name, cold, ahead in variants:
                pipeline.read_ahead = read_ahead if ahead else (lambda paths: None)
                if cold:
                    drop_from_page_cache(path)
                r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                res = pc.generate(encoded, case.question, config=cfg)
                wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
                cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
                runs[name].append({"wall_s": wall, "cpu_s": cpu, "major_faults": r1.ru_majflt - r0.ru_majflt})
                answers.add(tuple(res.token_ids))
                print(f"{name}: {wall:.2f} s (process CPU {cpu:.2f} s, {runs[name][-1]['major_faults']} major "
                      "faults)", file=sys.stderr, flush=True)
    finally:
        pipeline.read_ahead = read_ahead
    table = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print("| variant | wall s | process CPU s | major faults |")
    print("|---|---:|---:|---:|")
    for name, m in table.items():
        print(f"| {name} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['major_faults']:.0f} |")
    print(f"same answer in every run: {len(answers) == 1}; medians of {args.repeats}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tokens": args.tokens, "repeats": args.repeats, "medians": table, "runs": runs,
                       "same_answer": len(answers) == 1}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
