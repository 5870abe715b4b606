"""Kernel microbenchmarks: each kernel family over realistic shapes, against what users run instead.

    python benchmarks/kernel_bench.py                       # this machine: CPU path, SmolLM2 shapes, ~2-3 min
    python benchmarks/kernel_bench.py --models llama3-8b,smollm2-135m --out results/kernels.json   # on a GPU

Shapes: Llama-3-8B (32 query / 8 KV heads, d 128) and SmolLM2-135M (9 / 3, d 64); chunk prefill over
chunk lengths 2K-8K (packed varlen, --batch chunks), decoding over merged caches of 1K-32K tokens.
Comparisons, per shape:
  chunk_attention  the fused kernel (attention + window scores, w = --window) | the same kernel with
                   score_window=0 (what the fused scores cost) | torch SDPA plus a separate eager
                   window-score pass (repeat_kv, fp32 softmax over the last w rows: what upstream
                   ParallelComp and SnapKV do) | SDPA alone.
  select_kv        select_kv + gather_kv | upstream's eager max_pool1d + topk + sort + gather.
  decode_attention the split-K kernel on the compressed cache | torch SDPA (enable_gqa) on the same cache.

On a GPU: the Triton kernels, `triton.testing.do_bench` medians (bf16), TFLOP/s for attention and TB/s
for decoding from the FLOP and byte formulas in the kernels' docstrings (attention FLOPs count only
the attention itself, 4 * visible pairs * H * d, so every variant of a shape is divided by the same
work). Without a GPU: the PyTorch CPU path (fp32), medians of --repeats timed calls after a warm-up
(time.perf_counter), at the shapes given (default SmolLM2 only), plus the static compile report of the
Triton kernels for sm_80/sm_90 (`parallelcomp_triton.kernels.report`). The Triton interpreter is never
timed. Prints markdown tables and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from parallelcomp_triton.kernels.chunk_attention import chunk_attention
from parallelcomp_triton.kernels.decode_attention import decode_attention
from parallelcomp_triton.kernels.select_kv import gather_kv, select_kv

MODELS = {  # query heads, KV heads, head dim
    "llama3-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
}
GPU_DEFAULTS = {"models": "llama3-8b,smollm2-135m", "chunk_lengths": "2048,4096,8192", "batch": 4,
                "cache_lengths": "1024,4096,16384,32768"}
CPU_DEFAULTS = {"models": "smollm2-135m", "chunk_lengths": "2048,4096,8192", "batch": 1,
                "cache_lengths": "1024,4096,16384,32768"}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def make_timer(device: torch.device, repeats: int, warmup: int):
    """fn -> (median, min) seconds. GPU: triton.testing.do_bench; CPU: perf_counter over `repeats` calls
    (on a shared CPU the min is the less disturbed figure; both are reported)."""
    if device.type == "cuda":
        import triton.testing

        def gpu_time(fn):
            median, low = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.0])
            return median / 1e3, low / 1e3

        return gpu_time

    def cpu_time(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times), min(times)

    return cpu_time


# --------------------------------------------------------------------------------------------------
# Cost formulas (the kernels' docstrings)
# --------------------------------------------------------------------------------------------------


def causal_pairs(len_q: int, len_k: int) -> int:
    """Visible (query, key) pairs under bottom-right causal masking."""
    offset = len_k - len_q
    return sum(max(0, min(len_k, offset + i + 1)) for i in range(len_q))


def attention_flops(lens, num_heads: int, head_dim: int) -> int:
    return 4 * sum(causal_pairs(n, n) for n in lens) * num_heads * head_dim


def decode_bytes(batch: int, num_heads: int, num_kv_heads: int, cache_len: int, head_dim: int, elt: int) -> int:
    return 2 * batch * num_kv_heads * cache_len * head_dim * elt + 2 * batch * num_heads * head_dim * elt


# --------------------------------------------------------------------------------------------------
# Baselines: what upstream ParallelComp / SnapKV run
# --------------------------------------------------------------------------------------------------


def eager_window_scores(q4: torch.Tensor, k4: torch.Tensor, window: int) -> torch.Tensor:
    """Upstream's separate score pass: repeat_kv, the last `window` query rows against every key, causal
    corner masked, fp32 softmax, summed over the rows, then max over each GQA group. q4 [B, H, L, d],
    k4 [B, H_kv, L, d] -> [B, H_kv, L] fp32."""
    batch, num_heads, length, head_dim = q4.shape
    group = num_heads // k4.shape[1]
    keys = k4.repeat_interleave(group, dim=1)
    s = torch.matmul(q4[:, :, -window:], keys.transpose(-1, -2)).float() / math.sqrt(head_dim)
    rows = torch.arange(length - window, length, device=q4.device)[:, None]
    s.masked_fill_(torch.arange(length, device=q4.device)[None, :] > rows, float("-inf"))
    p = torch.softmax(s, dim=-1).sum(dim=-2)
    return p.view(batch, k4.shape[1], group, length).amax(dim=2)


def eager_select_gather(scores3: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, budget: int, pool: int):
    """Upstream's selection: max_pool1d over the scores, top-`budget` per head, indices sorted, K/V gathered.
    scores3 [B, H_kv, L] fp32, k4/v4 [B, H_kv, L, d]."""
    pooled = F.max_pool1d(scores3, kernel_size=pool, stride=1, padding=pool // 2)
    idx = pooled.topk(budget, dim=-1).indices.sort(dim=-1).values
    idx = idx[..., None].expand(-1, -1, -1, k4.shape[-1])
    return k4.gather(2, idx), v4.gather(2, idx)


# --------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------


def bench_chunk_attention(model, length, batch, window, device, dtype, backend, timer) -> list[dict]:
    num_heads, num_kv_heads, head_dim = MODELS[model]
    g = torch.Generator(device=device).manual_seed(0)
    total = batch * length
    q = torch.randn(total, num_heads, head_dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(total, num_kv_heads, head_dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(total, num_kv_heads, head_dim, device=device, dtype=dtype, generator=g)
    cu = torch.arange(0, total + 1, length, device=device, dtype=torch.int32)
    # SDPA's layout [B, H, L, d], made before timing: the baseline gets the layout it wants.
    q4, k4, v4 = (t.view(batch, length, -1, head_dim).transpose(1, 2).contiguous() for t in (q, k, v))

    def fused():
        return chunk_attention(q, k, v, cu, cu, causal=True, score_window=window, score_reduce="max",
                               return_lse=False, backend=backend)

    def no_scores():
        return chunk_attention(q, k, v, cu, cu, causal=True, score_window=0, return_lse=False, backend=backend)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)

    def sdpa_and_window():
        return sdpa(), eager_window_scores(q4, k4, window)

    # The comparison is only fair if both compute the same scores: record how far apart they are.
    fused_scores = fused()[2].view(batch, length, num_kv_heads).transpose(1, 2).float()
    diff = (fused_scores - sdpa_and_window()[1]).abs().max().item()
    flops = attention_flops([length] * batch, num_heads, head_dim)
    variants = [(f"fused kernel (w={window})", fused), ("kernel, score_window=0", no_scores),
                (f"SDPA + eager window pass (w={window})", sdpa_and_window), ("SDPA alone", sdpa)]
    rows = []
    for name, fn in variants:
        seconds, low = timer(fn)
        rows.append({"op": "chunk_attention", "model": model, "length": length, "batch": batch, "window": window,
                     "variant": name, "ms": 1e3 * seconds, "ms_min": 1e3 * low, "tflops": flops / seconds / 1e12,
                     "scores_max_abs_diff_vs_eager": diff})
    base = next(r["ms"] for r in rows if r["variant"].startswith("SDPA +"))
    for r in rows:
        r["speedup_vs_sdpa_window"] = base / r["ms"]
    return rows


def bench_select(model, length, batch, budget, device, dtype, backend, timer) -> list[dict]:
    _, num_kv_heads, head_dim = MODELS[model]
    g = torch.Generator(device=device).manual_seed(1)
    total = batch * length
    scores = torch.rand(total, num_kv_heads, device=device, generator=g)
    k = torch.randn(total, num_kv_heads, head_dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(total, num_kv_heads, head_dim, device=device, dtype=dtype, generator=g)
    cu = torch.arange(0, total + 1, length, device=device, dtype=torch.int32)
    scores3 = scores.view(batch, length, num_kv_heads).transpose(1, 2).contiguous()
    k4, v4 = (t.view(batch, length, num_kv_heads, head_dim).transpose(1, 2).contiguous() for t in (k, v))

    def ours():
        keep, _ = select_kv(scores, cu, budget, pool_kernel=7, backend=backend)
        return gather_kv(k, v, cu, keep, backend=backend)

    def upstream():
        return eager_select_gather(scores3, k4, v4, budget, 7)

    rows = []
    for name, fn in (("select_kv + gather_kv", ours), ("eager max_pool1d + topk + sort + gather", upstream)):
        seconds, low = timer(fn)
        rows.append({"op": "select_kv", "model": model, "length": length, "batch": batch, "budget": budget,
                     "variant": name, "ms": 1e3 * seconds, "ms_min": 1e3 * low})
    return rows


def bench_decode(model, cache_len, batch, device, dtype, backend, timer) -> list[dict]:
    num_heads, num_kv_heads, head_dim = MODELS[model]
    g = torch.Generator(device=device).manual_seed(2)
    q = torch.randn(batch, num_heads, head_dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(batch, num_kv_heads, cache_len, head_dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(batch, num_kv_heads, cache_len, head_dim, device=device, dtype=dtype, generator=g)
    lens = torch.full((batch,), cache_len, device=device, dtype=torch.int32)
    out = torch.empty_like(q)
    q4 = q[:, :, None]

    def ours():
        return decode_attention(q, k, v, lens, out=out, backend=backend)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

    nbytes = decode_bytes(batch, num_heads, num_kv_heads, cache_len, head_dim, q.element_size())
    flops = 4 * batch * num_heads * cache_len * head_dim
    rows = []
    for name, fn in (("decode kernel (split-K)", ours), ("SDPA (enable_gqa)", sdpa)):
        seconds, low = timer(fn)
        rows.append({"op": "decode_attention", "model": model, "cache_len": cache_len, "batch": batch,
                     "variant": name, "ms": 1e3 * seconds, "ms_min": 1e3 * low, "tb_per_s": nbytes / seconds / 1e12,
                     "tflops": flops / seconds / 1e12})
    return rows


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def environment(device: torch.device, backend: str, dtype: torch.dtype, argv) -> dict:
    import triton

    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": "python benchmarks/kernel_bench.py " + " ".join(argv),
           "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
           "backend": backend, "dtype": str(dtype).replace("torch.", ""),
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
           "timer": "triton.testing.do_bench median" if device.type == "cuda" else "time.perf_counter median"}
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or "unknown")


def tables(rows: list[dict], gpu: bool) -> str:
    out = []
    chunk = [r for r in rows if r["op"] == "chunk_attention"]
    if chunk:
        out += ["### chunk_attention (causal prefill of packed chunks; TFLOP/s = attention FLOPs / time)", "",
                "| model | chunk len x batch | variant | ms (median) | ms (min) | TFLOP/s | vs SDPA + window |",
                "|---|---|---|---:|---:|---:|---:|"]
        out += [f"| {r['model']} | {r['length']} x {r['batch']} | {r['variant']} | {r['ms']:.2f} | {r['ms_min']:.2f} | "
                f"{r['tflops']:.3f} | {r['speedup_vs_sdpa_window']:.2f}x |" for r in chunk]
        out += [""]
    sel = [r for r in rows if r["op"] == "select_kv"]
    if sel:
        out += ["### select_kv + gather_kv (max-pool 7, top-B per KV head, gather K/V)", "",
                "| model | chunk len x batch | budget | variant | ms (median) | ms (min) |",
                "|---|---|---:|---|---:|---:|"]
        out += [f"| {r['model']} | {r['length']} x {r['batch']} | {r['budget']} | {r['variant']} | {r['ms']:.2f} | "
                f"{r['ms_min']:.2f} |" for r in sel]
        out += [""]
    dec = [r for r in rows if r["op"] == "decode_attention"]
    if dec:
        unit, scale = ("TB/s", 1.0) if gpu else ("GB/s", 1e3)
        out += [f"### decode_attention (one token over the merged cache; {unit} = K/V/q/out bytes / time)", "",
                f"| model | cache len x batch | variant | ms (median) | ms (min) | {unit} (median) |",
                "|---|---|---|---:|---:|---:|"]
        out += [f"| {r['model']} | {r['cache_len']} x {r['batch']} | {r['variant']} | {r['ms']:.3f} | "
                f"{r['ms_min']:.3f} | {r['tb_per_s'] * scale:.2f} |" for r in dec]
        out += [""]
    return "\n".join(out)


def compile_summary(report_rows: list[dict]) -> str:
    lines = ["### Static compile report (Triton -> PTX -> ptxas, no GPU needed)", "",
             "| kernel | target | dtype | d | registers | spills (B) | shared KiB (limit) |",
             "|---|---|---|---:|---:|---:|---:|"]
    seen = set()
    for r in report_rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r.get('target')} | {r['dtype']} | {r['head_dim']} | "
                         f"error: {r['error'][:60]} | | |")
            continue
        key = (r["kernel"], r["target"], r["dtype"], r["head_dim"], r["registers"], r["spill_bytes"],
               r["shared_bytes"])
        if key in seen:  # specialisations with identical resources: one line
            continue
        seen.add(key)
        lines.append(f"| {r['kernel']} | {r['target']} | {r['dtype']} | {r['head_dim']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} ({r['shared_limit_bytes'] // 1024}) |")
    errors = sum("error" in r for r in report_rows)
    spills = sum(r.get("spill_bytes", 0) > 0 for r in report_rows)
    lines += ["", f"{len(report_rows)} specialisations compiled, {errors} failed, {spills} with register spills."]
    return "\n".join(lines)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"error: {flag} needs integers >= 1")
    return values


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    gpu = torch.cuda.is_available()
    d = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=d["models"], help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--ops", default="chunk,select,decode", help="chunk, select, decode (comma-separated)")
    p.add_argument("--chunk-lengths", default=d["chunk_lengths"])
    p.add_argument("--batch", type=int, default=d["batch"], help="chunks packed in one prefill call")
    p.add_argument("--window", type=int, default=8, help="w: question rows that score keys")
    p.add_argument("--budget", type=int, default=1024, help="B: kept tokens per chunk and KV head")
    p.add_argument("--cache-lengths", default=d["cache_lengths"])
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="CPU: timed calls per case (median and min)")
    p.add_argument("--warmup", type=int, default=1, help="CPU: untimed calls first")
    p.add_argument("--no-compile-report", action="store_true", help="skip the sm_80/sm_90 compile report")
    p.add_argument("--out", default="results/kernels.json")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    ops = {o.strip() for o in args.ops.split(",") if o.strip()}
    if unknown or not models or not ops <= {"chunk", "select", "decode"} or not ops:
        print(f"error: --models from {', '.join(MODELS)}; --ops from chunk, select, decode", file=sys.stderr)
        return 2
    try:
        chunk_lengths = _ints(args.chunk_lengths, "--chunk-lengths")
        cache_lengths = _ints(args.cache_lengths, "--cache-lengths")
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    if min(args.batch, args.window, args.budget, args.decode_batch, args.repeats) < 1 or args.warmup < 0:
        print("error: --batch, --window, --budget, --decode-batch and --repeats must be >= 1", file=sys.stderr)
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.out))

    device = torch.device("cuda" if gpu else "cpu")
    # Never the interpreter: Triton kernels on a GPU, the PyTorch path on the CPU.
    backend, dtype = ("triton", torch.bfloat16) if gpu else ("torch", torch.float32)
    env = environment(device, backend, dtype, argv)
    timer = make_timer(device, args.repeats, args.warmup)
    print(f"# Kernel benchmarks: {env['device']}, {env['backend']} backend, {env['dtype']}")
    print(f"{env['date']}; torch {env['torch']} ({env['torch_threads']} threads, {env['cpu_count']} CPUs), triton "
          f"{env['triton']}; load average {env['load_average_1_5_15']} at start; timer: {env['timer']}"
          + ("" if gpu else f" of {args.repeats} calls after {args.warmup} warm-up"))
    print(f"command: {env['command']}\n", flush=True)

    rows = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for model in models:
            for length in chunk_lengths if "chunk" in ops else ():
                rows += bench_chunk_attention(model, length, args.batch, args.window, device, dtype, backend, timer)
                print(f"  chunk_attention {model} L={length}: done ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
            for length in chunk_lengths if "select" in ops else ():
                rows += bench_select(model, length, args.batch, min(args.budget, length), device, dtype, backend,
                                     timer)
            for cache_len in cache_lengths if "decode" in ops else ():
                rows += bench_decode(model, cache_len, args.decode_batch, device, dtype, backend, timer)
    print(tables(rows, gpu))
    env["load_average_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
    env["bench_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"timed in {env['bench_seconds']} s; load average at end {env['load_average_1_5_15_end']}\n")

    report = None
    if not args.no_compile_report:
        from parallelcomp_triton.kernels.report import compile_report

        t = time.perf_counter()
        report = compile_report()
        print(compile_summary(report))
        print(f"(compiled in {time.perf_counter() - t:.0f} s)")
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": env, "results": rows, "compile_report": report}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
