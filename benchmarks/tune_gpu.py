"""Tune the Triton kernels on the GPU at hand and write `kernels/tuned/<arch>.json` (read by the launch
wrappers through kernels/tuning.py), with torch's SDPA timed on the same card.

    python benchmarks/tune_gpu.py [--out kernels/tuned] [--log benchmarks/results/gpu/tune.jsonl]
                                  [--budget-s 450] [--dtypes bf16] [--quick]
    python benchmarks/tune_gpu.py --smoke      # tiny shapes, any device (the interpreter on CPU): the plumbing

Steps, each saved as it finishes (the table is rewritten after every shape class, every timing is a line of
--log), so a run cut short by the device lease keeps what it measured:
1. compile: every candidate config is launched once on a small input of each shape class in worker
   processes (in parallel; they fill Triton's on-disk cache, so the timing process loads, not compiles);
2. chunk_attention: d 64 with 9/3 heads and d 128 with 32/8 heads; 4 and 16 chunks of 1K-8K tokens;
   window 0 and 8 rows. Per candidate the median of repeats (CUDA events); beside it SDPA batched over
   equal chunks (the issue's yardstick), SDPA per chunk (what the dispatch would run instead: window 0) and
   SDPA plus an eager window pass (window 8);
3. decode_attention: caches of 1K-32K keys, batch 1-8, the same heads, tiles x warps x split counts,
   beside SDPA over the unmasked cache and the masked SDPA face the dispatch would run;
4. each shape class's winner is checked against the float64 reference (a small odd-length case with the
   same config); a config that fails is dropped and the next best taken.
The entry's `use` is "sdpa" where even the best config loses to the SDPA face the dispatch can take.
Never asserts timings; prints a table per kernel.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADS = ((9, 3, 64), (32, 8, 128))       # the bundled model's and Llama-3-8B's attention shapes
CHUNK_LENS = (1024, 2048, 4096, 8192)
CHUNK_COUNTS = (4, 16)
WINDOWS = (0, 8)
CACHE_LENS = (1024, 2048, 4096, 8192, 16384, 32768)
BATCHES = (1, 2, 4, 8)
CHUNK_CONFIGS = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
                 for m, n, w, s in ((64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 4, 3),
                                    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2))]
DECODE_CONFIGS = [dict(BLOCK_N=n, num_warps=w, num_stages=2) for n in (32, 64, 128) for w in (2, 4, 8)]
DECODE_SPLITS = (None, 1, 2, 4, 8, 16, 32, 64)  # None: the wrapper's own count (fills the GPU)
CHECK_LENS = [1000, 517, 77]    # the reference check's chunks (odd lengths) and decode cache
SMOKE = False                   # --smoke: one repeat per timing


# ------------------------------------------------------------------------------------------ inputs
def chunk_inputs(torch, heads, kv_heads, d, lens, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lens)
    q, k, v = (torch.randn(total, h, d, generator=g).to(device=device, dtype=dtype)
               for h in (heads, kv_heads, kv_heads))
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    return q, k, v, cu, bounds


def decode_inputs(torch, heads, kv_heads, d, batch, cache, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, heads, d, generator=g).to(device=device, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, cache, d, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    lens = torch.full((batch,), cache, dtype=torch.int32, device=device)
    return q, k, v, lens


# ------------------------------------------------------------------------------------------ timing
def median_ms(torch, fn, device, min_reps=10, min_s=0.15) -> float:
    if SMOKE:
        min_reps, min_s = 1, 0.0
    fn()  # warm (loads the compiled kernel)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_s:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
        if len(times) >= 200:
            break
    return statistics.median(times)


def sdpa_batched(torch, q, k, v, n, length, causal=True):
    """SDPA over equal chunks as one [n, H, L, d] batch: the yardstick the issue's targets use."""
    F = torch.nn.functional
    qb = q.view(n, length, q.shape[1], q.shape[2]).transpose(1, 2)
    kb = k.view(n, length, k.shape[1], k.shape[2]).transpose(1, 2)
    vb = v.view(n, length, v.shape[1], v.shape[2]).transpose(1, 2)
    return F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, enable_gqa=True)


def eager_window(torch, q, k, n, length, window):
    """The window rows' softmax column sums in eager torch (what a SDPA-based path would add)."""
    heads, kv = q.shape[1], k.shape[1]
    qw = q.view(n, length, heads, -1)[:, -window:].transpose(1, 2).float()       # [n, H, w, d]
    kb = k.view(n, length, kv, -1).transpose(1, 2).float().repeat_interleave(heads // kv, 1)
    s = qw @ kb.transpose(-1, -2) / math.sqrt(q.shape[2])
    rows = torch.arange(length - window, length, device=q.device)
    s = s.masked_fill(torch.arange(length, device=q.device)[None, :] > rows[:, None], float("-inf"))
    return s.softmax(-1).sum(2).view(n, kv, heads // kv, length).amax(2)


# ------------------------------------------------------------------------------------------ compile
def _compile_worker(job) -> str:
    """Launch one config once on a small input with the shape class's head counts (same specialisation)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    from parallelcomp_triton.kernels.chunk_attention import chunk_attention_triton
    from parallelcomp_triton.kernels.decode_attention import decode_attention_triton

    kind, heads, kv, d, dtype_name, window, config, splits = job
    device = torch.device("cuda")
    dtype = getattr(torch, dtype_name)
    try:
        if kind == "chunk":
            q, k, v, cu, bounds = chunk_inputs(torch, heads, kv, d, [256, 256], dtype, device)
            chunk_attention_triton(q, k, v, cu, cu, causal=True, score_window=window, score_reduce="max",
                                   bounds_q=bounds, bounds_k=bounds, config=config)
        else:
            q, k, v, lens = decode_inputs(torch, heads, kv, d, 2, 512, dtype, device)
            decode_attention_triton(q, k, v, lens, config=dict(config, splits=splits))
        torch.cuda.synchronize()
        return ""
    except Exception as e:  # a config that does not compile (shared memory) is skipped later
        return f"{kind} {config}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def compile_all(jobs, workers: int) -> list[str]:
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [e for e in pool.map(_compile_worker, jobs) if e]


# ------------------------------------------------------------------------------------------ checks
def passes_reference(torch, kind, heads, kv, d, dtype, device, window, config) -> bool:
    """The config on a small odd-length case against the float64 reference (flash-attention's rule: the
    error at most twice the error of the same computation in torch at this dtype, plus a floor)."""
    from parallelcomp_triton.kernels.chunk_attention import (chunk_attention_reference, chunk_attention_torch,
                                                             chunk_attention_triton)
    from parallelcomp_triton.kernels.decode_attention import (decode_attention_reference, decode_attention_torch,
                                                              decode_attention_triton)

    if kind == "chunk":
        q, k, v, cu, bounds = chunk_inputs(torch, heads, kv, d, CHECK_LENS, dtype, device, seed=7)
        ref, _, ref_s = chunk_attention_reference(q, k, v, cu, cu, score_window=window, score_reduce="max")
        got, _, got_s = chunk_attention_triton(q, k, v, cu, cu, score_window=window, score_reduce="max",
                                               bounds_q=bounds, bounds_k=bounds, config=config)
        base, _, base_s = chunk_attention_torch(q, k, v, cu, cu, score_window=window, score_reduce="max")
        pairs = [(got, base, ref)] + ([(got_s, base_s, ref_s)] if window else [])
    else:
        q, k, v, lens = decode_inputs(torch, heads, kv, d, 3, CHECK_LENS[0], dtype, device, seed=7)
        lens = torch.tensor([CHECK_LENS[0], CHECK_LENS[1], 1], dtype=torch.int32, device=device)
        ref = decode_attention_reference(q.double(), k.double(), v.double(), lens)
        got = decode_attention_triton(q, k, v, lens, config=config)
        base = decode_attention_torch(q, k, v, lens)
        pairs = [(got, base, ref)]
    for got, base, ref in pairs:
        err = (got.double() - ref.double()).abs().max().item()
        base_err = (base.double() - ref.double()).abs().max().item()
        if not err <= 2 * base_err + 1e-5 or not torch.isfinite(got).all():
            return False
    return True


# ------------------------------------------------------------------------------------------ tables
class Saver:
    def __init__(self, out_dir: Path, arch: str, log: Path | None, meta: dict):
        self.path = out_dir / f"{arch}.json"
        self.log = log
        self.table = {"arch": arch, **meta, "entries": []}
        out_dir.mkdir(parents=True, exist_ok=True)
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)

    def record(self, row: dict) -> None:
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(json.dumps(row) + "\n")

    def add(self, entry: dict) -> None:
        self.table["entries"].append(entry)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.table, indent=1))
        os.replace(tmp, self.path)


def tune_chunk(torch, saver, device, dtype_name, heads, kv, d, length, window, counts, deadline, broken) -> None:
    from parallelcomp_triton.kernels.chunk_attention import chunk_attention_sdpa, chunk_attention_triton

    dtype = getattr(torch, dtype_name)
    totals = {i: 0.0 for i in range(len(CHUNK_CONFIGS))}
    sdpa_face = batched = window_pass = 0.0
    for n in counts:
        q, k, v, cu, bounds = chunk_inputs(torch, heads, kv, d, [length] * n, dtype, device)
        for i, config in enumerate(CHUNK_CONFIGS):
            if i not in totals or (dtype_name, d, i) in broken:
                totals.pop(i, None)
                continue
            try:
                ms = median_ms(torch, lambda: chunk_attention_triton(
                    q, k, v, cu, cu, score_window=window, score_reduce="max", bounds_q=bounds, bounds_k=bounds,
                    config=config), device)
            except Exception as e:
                saver.record({"kernel": "chunk_attention", "config": config, "error": str(e)[:200]})
                totals.pop(i)
                continue
            totals[i] += ms
            saver.record({"kernel": "chunk_attention", "dtype": dtype_name, "heads": heads, "kv_heads": kv,
                          "head_dim": d, "chunks": n, "chunk_len": length, "window": window, "config": config,
                          "ms": ms})
        b = median_ms(torch, lambda: sdpa_batched(torch, q, k, v, n, length), device)
        batched += b
        f = median_ms(torch, lambda: chunk_attention_sdpa(q, k, v, cu, cu, bounds_q=bounds, bounds_k=bounds), device)
        sdpa_face += f
        w = median_ms(torch, lambda: eager_window(torch, q, k, n, length, window), device) if window else 0.0
        window_pass += w
        saver.record({"kernel": "sdpa", "dtype": dtype_name, "heads": heads, "kv_heads": kv, "head_dim": d,
                      "chunks": n, "chunk_len": length, "batched_ms": b, "per_chunk_ms": f, "window_pass_ms": w})
        if time.monotonic() > deadline:
            break
    ranked = sorted(totals, key=totals.get)
    for i in ranked:
        if passes_reference(torch, "chunk", heads, kv, d, dtype, device, window, CHUNK_CONFIGS[i]):
            ms = totals[i]
            use = "sdpa" if window == 0 and sdpa_face < ms else "triton"
            saver.add({"kernel": "chunk_attention", "dtype": DTYPES[dtype_name], "head_dim": d, "group": heads // kv,
                       "window": bool(window), "bucket": length, "config": CHUNK_CONFIGS[i], "use": use,
                       "ms": round(ms, 4), "sdpa_ms": round(sdpa_face, 4), "sdpa_batched_ms": round(batched, 4),
                       "window_pass_ms": round(window_pass, 4), "chunk_counts": list(counts)})
            print(f"chunk_attention {dtype_name} d{d} {heads}/{kv} L{length} w{window}: {CHUNK_CONFIGS[i]} "
                  f"{ms:.3f} ms; SDPA batched {batched:.3f} (+window {window_pass:.3f}) -> "
                  f"{(batched + window_pass) / ms:.2f}x; dispatch {use}", flush=True)
            return
        saver.record({"kernel": "chunk_attention", "config": CHUNK_CONFIGS[i], "error": "failed the reference"})


def tune_decode(torch, saver, device, dtype_name, heads, kv, d, batch, cache, deadline, splits_used) -> None:
    from parallelcomp_triton.kernels.decode_attention import decode_attention_sdpa, decode_attention_triton

    dtype = getattr(torch, dtype_name)
    q, k, v, lens = decode_inputs(torch, heads, kv, d, batch, cache, dtype, device)
    results = []
    for config in DECODE_CONFIGS:
        for splits in splits_used:
            cfg = dict(config, splits=splits) if splits else dict(config)
            try:
                ms = median_ms(torch, lambda: decode_attention_triton(q, k, v, lens, config=cfg), device, min_s=0.05)
            except Exception as e:
                saver.record({"kernel": "decode_attention", "config": cfg, "error": str(e)[:200]})
                continue
            results.append((ms, cfg))
        if time.monotonic() > deadline:
            break
    F = torch.nn.functional
    plain = median_ms(torch, lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True), device)
    face = median_ms(torch, lambda: decode_attention_sdpa(q, k, v, lens), device)
    kv_bytes = 2 * batch * kv * cache * d * q.element_size()
    for ms, cfg in sorted(results, key=lambda r: r[0]):
        if passes_reference(torch, "decode", heads, kv, d, dtype, device, 0, cfg):
            use = "sdpa" if face < ms else "triton"
            saver.add({"kernel": "decode_attention", "dtype": DTYPES[dtype_name], "head_dim": d, "group": heads // kv,
                       "batch": batch, "bucket": cache, "config": cfg, "use": use, "ms": round(ms, 5),
                       "sdpa_ms": round(plain, 5), "sdpa_masked_ms": round(face, 5),
                       "kv_gb_per_s": round(kv_bytes / ms / 1e6, 1)})
            print(f"decode_attention {dtype_name} d{d} {heads}/{kv} B{batch} S{cache}: {cfg} {ms * 1000:.1f} us "
                  f"({kv_bytes / ms / 1e6:.0f} GB/s); SDPA {plain * 1000:.1f} us -> {plain / ms:.2f}x; dispatch {use}",
                  flush=True)
            return


DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/tune_gpu.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "kernels" / "tuned"), help="folder of <arch>.json")
    p.add_argument("--log", default=str(ROOT / "benchmarks" / "results" / "gpu" / "tune.jsonl"),
                   help="every timing, one JSON line each (appended)")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting new shape classes after this")
    p.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16, float16")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="parallel compile workers")
    p.add_argument("--quick", action="store_true", help="2K and 8K chunks, 4K and 32K caches, batch 1 and 8")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any device: checks the plumbing only")
    args = p.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("tune_gpu: no CUDA GPU here (use --smoke to check the plumbing)", file=sys.stderr)
        return 2
    from parallelcomp_triton.kernels.tuning import device_arch

    arch = device_arch(device) or "cpu_smoke"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    import triton

    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "commit": commit}
    saver = Saver(Path(args.out), arch, Path(args.log) if args.log else None, meta)
    dtypes = args.dtypes.split(",")
    heads_list, chunk_lens, counts, caches, batches = HEADS, CHUNK_LENS, CHUNK_COUNTS, CACHE_LENS, BATCHES
    if args.quick:
        chunk_lens, caches, batches = (2048, 8192), (4096, 32768), (1, 8)
    if args.smoke:
        global SMOKE
        SMOKE = True
        CHECK_LENS[:] = [40, 17, 5]
        heads_list, chunk_lens, counts, caches, batches = ((4, 2, 64),), (64,), (2,), (256,), (2,)
        CHUNK_CONFIGS[:] = CHUNK_CONFIGS[:2]
        DECODE_CONFIGS[:] = DECODE_CONFIGS[:2]
        DECODE_SPLITS_USED = (None, 2)
    else:
        DECODE_SPLITS_USED = DECODE_SPLITS

    broken = set()
    if device.type == "cuda":
        jobs = [("chunk", h, kv, d, dt, w, c, None) for dt in dtypes for h, kv, d in heads_list for w in WINDOWS
                for c in CHUNK_CONFIGS]
        jobs += [("decode", h, kv, d, dt, 0, c, s) for dt in dtypes for h, kv, d in heads_list
                 for c in DECODE_CONFIGS for s in (1, 2)]
        errors = compile_all(jobs, args.workers)
        for e in errors:
            print("compile:", e, file=sys.stderr)
        print(f"compiled {len(jobs)} variants in {time.monotonic() - start:.0f} s ({len(errors)} failed)", flush=True)

    for dtype_name in dtypes:
        for heads, kv, d in heads_list:
            for window in WINDOWS:
                for length in chunk_lens:
                    if time.monotonic() > deadline:
                        break
                    tune_chunk(torch, saver, device, dtype_name, heads, kv, d, length, window, counts, deadline, broken)
            for batch in batches:
                for cache in caches:
                    if time.monotonic() > deadline:
                        break
                    tune_decode(torch, saver, device, dtype_name, heads, kv, d, batch, cache, deadline,
                                DECODE_SPLITS_USED)
    if time.monotonic() > deadline:
        print(f"tune_gpu: budget of {args.budget_s:.0f} s reached; the table holds what was measured", flush=True)
    print(f"wrote {saver.path} ({len(saver.table['entries'])} entries) in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
