"""Decode speed in float32 and bf16 side by side, in one process, alternating.

    python benchmarks/decode_ab.py --tokens 4000 --new-tokens 48 --repeats 4 --out benchmarks/results/decode_ab.json

Both precisions of the bundled model answer the same passkey document (the merged cache a decode step reads
is about the same for any document length: K chunks x B kept tokens + the prefix and question, ~1.5K tokens
per layer with the defaults), decoding exactly --new-tokens tokens (ignore_eos); runs alternate float32,
bf16, and bf16 with its one-row linear layers on oneDNN (as before 97d47a8: `model._NATIVE_GEMV_ROWS = 0`), so
all three see the same machine. Reports each one's median ms/token and the ratios to float32.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4000)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from parallelcomp_triton import ParallelComp, ParallelCompConfig
    from parallelcomp_triton.tasks import passkey_case

    models = {name: ParallelComp.from_pretrained(dtype=name) for name in ("float32", "bfloat16")}
    case = passkey_case(models["float32"].tokenizer, args.tokens, depth=0.5, seed=0, question="natural")
    cfg = ParallelCompConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    from parallelcomp_triton import model as model_module

    gemv_rows = model_module._NATIVE_GEMV_ROWS
    variants = {"float32": (models["float32"], gemv_rows), "bfloat16": (models["bfloat16"], gemv_rows),
                "bfloat16, oneDNN GEMV": (models["bfloat16"], 0)}
    ms = {name: [] for name in variants}
    kv, answers = {}, {}
    try:
        for rep in range(args.repeats + 1):  # the first round warms up
            for name, (pc, rows) in variants.items():
                model_module._NATIVE_GEMV_ROWS = rows
                res = pc.generate(case.context, case.question, config=cfg)
                if rep:
                    ms[name].append(res.stats["decode_ms_per_token"])
                kv[name], answers[name] = res.stats["kv_tokens_per_layer_after"], res.text
    finally:
        model_module._NATIVE_GEMV_ROWS = gemv_rows
    med = {name: statistics.median(v) for name, v in ms.items()}
    ratio = med["bfloat16"] / med["float32"]
    print(f"threads {torch.get_num_threads()}; merged cache {kv['float32']} tokens per layer; "
          f"{args.new_tokens} new tokens")
    for name in variants:
        print(f"{name:22s} decode {med[name]:6.1f} ms/token, {med[name] / med['float32']:.2f}x float32 "
              f"(median of {args.repeats}: {', '.join(f'{x:.1f}' for x in ms[name])}); answer {answers[name][:40]!r}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
                       "threads": torch.get_num_threads(), "tokens": args.tokens, "kv_tokens_per_layer": kv,
                       "decode_ms_per_token": ms, "median": med, "ratio_bf16_to_float32": ratio,
                       "answers": answers}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
