"""End-to-end benchmark on the bundled model: prefill, question pass, decode, peak RSS, KV bytes.

    python benchmarks/e2e.py --lengths 8000,16000,32000,64000,128000 --out results/e2e.json
    python benchmarks/e2e.py --lengths 32000,128000 --methods parallelcomp --dtypes float32,auto --breakdown
    python benchmarks/e2e.py --gpu-headline --lengths 32000,128000 --out results/gpu/headline.json   # on a GPU

Every (method, length) runs in its own subprocess so that peak RSS belongs to that run alone. Methods:
`parallelcomp` (package defaults), `truncate` (head and tail that fit the window) and `hf_full`
(transformers LlamaForCausalLM, sdpa, the whole document in one causal pass, then greedy decoding with its
cache), the last one only up to --hf-max tokens. Also measured: the machine's GEMM rate at the model's
shapes, and the linear-layer floor for each length (2 x non-embedding parameters x tokens / rate).
--breakdown adds a profiled second prefill split into linear GEMMs, attention and other ops (multiples of
the floor); --chunk-tokens runs ParallelComp at another chunk length.
Prints a markdown table and, with --plot (matplotlib, `pip install -e .[plot]`), a PNG of prefill time and
peak RSS against document length; --plot-only JSON redraws the PNG from earlier results. Never asserts
timings.

--gpu-headline (CUDA): the bundled model with ParallelComp at each length (prefill s, decode ms/token, peak
GPU memory), then a model of Llama-3-8B's shape with random weights (its config, nothing downloaded):
ParallelComp's prefill against full attention (one causal pass with torch's SDPA, the same model code) on
the same card, full attention at every length up to the longest that fits (--full-max), the rest
extrapolated from the two longest measured (quadratic attention plus linear rest) and labelled so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

QUESTION = "What is the main topic of the text above? Answer in one sentence."


def essay_text(tokenizer, tokens: int) -> str:
    from parallelcomp_triton.tasks import essay_tokens

    ids = essay_tokens(tokenizer)
    if tokens > len(ids):
        ids = ids * (tokens // len(ids) + 1)
    return tokenizer.decode(list(ids[:tokens]))


def _median_rate(flops: float, step, seconds: float, min_repeats: int) -> float:
    step()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    return flops / times[len(times) // 2]


def gemm_rate(hidden: int, inter: int, rows: int = 2048, seconds: float = 3.0, min_repeats: int = 10) -> float:
    """Median FLOP/s of the model's MLP-shaped fp32 GEMM pair on `rows` random rows, over at least `seconds` of
    repeats (a handful of repeats read anywhere from 64 to 93 GFLOP/s on the same idle 2-core machine)."""
    import torch

    x = torch.randn(rows, hidden)
    w1, w2 = torch.randn(inter, hidden), torch.randn(hidden, inter)
    return _median_rate(2 * 2 * rows * hidden * inter, lambda: (x @ w1.T) @ w2.T, seconds, min_repeats)


def layer_gemm_rate(model, rows: int, seconds: float = 3.0, min_repeats: int = 5, dtype=None) -> float:
    """Median FLOP/s of one decoder layer's seven projections (q, k, v, o, gate, up, down: the model's own
    weights, so every shape the linear floor counts, weighted by its FLOPs) on `rows` rows, the row count of
    one prefill batch; in `dtype` (default: the model's)."""
    import torch
    import torch.nn.functional as F

    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    weights = [m.weight.detach().to(dtype or m.weight.dtype) for m in (attn.q_proj, attn.k_proj, attn.v_proj,
                                                                        attn.o_proj, mlp.gate_proj, mlp.up_proj,
                                                                        mlp.down_proj)]
    x = torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype)
    h = torch.randn(rows, weights[-1].shape[1], dtype=weights[0].dtype)
    inputs = [h if w.shape[1] == h.shape[1] else x for w in weights]
    flops = sum(2 * rows * w.numel() for w in weights)
    return _median_rate(flops, lambda: [F.linear(a, w) for a, w in zip(inputs, weights)], seconds, min_repeats)


_LINEAR_OPS = ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")  # matmul: only its self time
_ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")


def prefill_breakdown(prof) -> dict:
    """Self CPU seconds of one profiled prefill by kind: the linear layers' GEMMs, the attention kernel, and
    every other op (norms, rotary, activation, residual adds, window scores, KV selection, copies)."""
    out = {"linear_s": 0.0, "attention_s": 0.0, "other_ops_s": 0.0}
    for e in prof.key_averages():
        kind = "linear_s" if e.key in _LINEAR_OPS else "attention_s" if e.key in _ATTENTION_OPS else "other_ops_s"
        out[kind] += e.self_cpu_time_total / 1e6
    return out


PROBE_DTYPES = ("float32", "bfloat16")  # every run probes both GEMM rates, so each row has both floors


def run_one(method: str, tokens: int, max_new: int, breakdown: bool = False, chunk_tokens: int | None = None,
            dtype: str = "auto") -> dict:
    import torch

    from parallelcomp_triton import ParallelComp, ParallelCompConfig

    pc = ParallelComp.from_pretrained(None, dtype=dtype if method != "hf_full" else "float32")
    doc = essay_text(pc.tokenizer, tokens)
    cfg = ParallelCompConfig(mode=method if method != "hf_full" else "parallelcomp", max_new_tokens=max_new,
                             ignore_eos=True,  # fixed decode steps
                             **({"chunk_tokens": chunk_tokens} if chunk_tokens is not None else {}))
    # The GEMM rates right before the run, in the same process: the floor they set is side by side with the
    # prefill it is compared to, not minutes apart. `gemm_gflops` (the floor's rate): the seven projections
    # of a layer at the row count of one prefill batch; `gemm_mlp_gflops`: the MLP pair alone at 2048 rows
    # (the earlier probe, kept for comparison; the fastest of the model's shapes).
    # `gemm_gflops_<dtype>`: the same layer probe in float32 and in bf16, so every row, whatever precision it
    # ran in, is compared with both floors measured side by side.
    rows = cfg.batch_chunks * (cfg.chunk_tokens or 1024)
    out = {"method": method, "tokens": tokens, "chunk_tokens": cfg.chunk_tokens,
           "dtype": str(pc.model.embed_tokens.weight.dtype).removeprefix("torch."), "dtype_source": pc.dtype_source,
           "gemm_mlp_gflops": gemm_rate(pc.args.hidden_size, pc.args.intermediate_size) / 1e9}
    for name in PROBE_DTYPES:
        out[f"gemm_gflops_{name}"] = layer_gemm_rate(pc.model, rows, dtype=getattr(torch, name)) / 1e9
    out["gemm_gflops"] = out[f"gemm_gflops_{out['dtype']}"] if out["dtype"] in PROBE_DTYPES else \
        layer_gemm_rate(pc.model, rows) / 1e9
    if method in ("parallelcomp", "truncate"):
        res = pc.generate(doc, QUESTION, config=cfg)
        st = res.stats
        out.update(prefill_s=st.time_prefill_s, question_s=st.time_question_s,
                   decode_ms_per_token=st.decode_ms_per_token, new_tokens=st.new_tokens,
                   kv_cache_bytes=st.kv_cache_bytes, document_tokens=st.document_tokens,
                   chunks=len(st.chunk_spans), answer=res.text,
                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if breakdown:
            # A second prefill of the same document under torch.profiler (the timed one above runs without it).
            from torch.profiler import ProfilerActivity, profile

            import parallelcomp_triton.score as score

            profiled, run_prefill = [], score.prefill

            def prefill(*args, **kwargs):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    t = time.perf_counter()
                    run_prefill(*args, **kwargs)
                    wall = time.perf_counter() - t
                profiled.append((prof, wall))

            score.prefill = prefill  # the facade calls the stage through its module
            try:
                pc.generate(doc, QUESTION, config=dataclasses.replace(cfg, max_new_tokens=1))  # same settings
            finally:
                score.prefill = run_prefill
            prof, wall = profiled[0]
            out["breakdown"] = dict(prefill_breakdown(prof), profiled_prefill_s=wall)
    else:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(pc.source, dtype=torch.float32, attn_implementation="sdpa").eval()
        del pc.model
        prompt = doc + "\n\n" + QUESTION
        ids = torch.tensor([pc.tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            t = time.perf_counter()
            o = hf(ids, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - t
            past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(max_new - 1):
                o = hf(nxt, past_key_values=past, use_cache=True)
                past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
            dec = time.perf_counter() - t
        cfg = hf.config
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (ids.shape[1] + max_new) * (
            cfg.hidden_size // cfg.num_attention_heads) * 4
        out.update(prefill_s=prefill, question_s=0.0, decode_ms_per_token=1000 * dec / max(1, max_new - 1),
                   new_tokens=max_new, kv_cache_bytes=kv, document_tokens=ids.shape[1], chunks=1)
    # Before any profiled run (the profiler's event buffers would count).
    out.setdefault("peak_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out


# Llama-3-8B's shape (config.json of meta-llama/Meta-Llama-3-8B), trained window 8K.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192)


def _random_model(torch, args, device):
    from parallelcomp_triton.model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def _full_prefill_s(torch, model, ids) -> float:
    """One causal pass over the whole document with SDPA (flash on the GPU), last row's logits only."""
    import torch.nn.functional as F

    def attend(layer, q, k, v):
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                              v.transpose(0, 1)[None], is_causal=True,
                                              enable_gqa=True)[0].transpose(0, 1)

    pos = torch.arange(ids.numel(), device=ids.device)
    last = torch.tensor([ids.numel() - 1], device=ids.device)
    with torch.no_grad():
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.lm_head_rows(model(ids, pos, attend, out_rows=last))
        torch.cuda.synchronize()
    return time.perf_counter() - t


def gpu_headline(lengths: list[int], out_path: str, full_max: int) -> dict:
    import torch

    from parallelcomp_triton import ParallelComp, ParallelCompConfig
    from parallelcomp_triton.model import ModelArgs

    device = torch.device("cuda")
    rows = []
    pc = ParallelComp.from_pretrained(None, device="cuda")
    cfg = ParallelCompConfig(max_new_tokens=64, ignore_eos=True)

    def timed(pc, doc, cfg):
        pc.generate(doc, QUESTION, config=cfg)  # compiles the kernels, warms the allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        res = pc.generate(doc, QUESTION, config=cfg)
        return res.stats, torch.cuda.max_memory_allocated() / 2**30

    for n in lengths:
        st, peak = timed(pc, essay_text(pc.tokenizer, n), cfg)
        rows.append({"model": "SmolLM2-135M-Instruct", "method": "parallelcomp", "tokens": st.document_tokens,
                     "prefill_s": st.time_prefill_s, "decode_ms_per_token": st.decode_ms_per_token,
                     "gpu_peak_gib": peak})
        print(f"bundled {n}: prefill {st.time_prefill_s:.3f} s, decode {st.decode_ms_per_token:.2f} ms/token, "
              f"{peak:.2f} GiB", flush=True)
        _save(out_path, rows)
    tokenizer = pc.tokenizer
    del pc
    torch.cuda.empty_cache()

    args = ModelArgs(**LLAMA3_8B, bos_token_id=tokenizer.bos_token_id, eos_token_ids=(tokenizer.eos_token_id,))
    big = ParallelComp(_random_model(torch, args, device), tokenizer, "llama3-8b-shaped (random weights)")
    full_s = {}
    for n in lengths:
        doc = essay_text(tokenizer, n)
        st, peak = timed(big, doc, ParallelCompConfig(max_new_tokens=1, chunk_tokens=None))
        row = {"model": "Llama-3-8B shape, random weights", "method": "parallelcomp", "tokens": st.document_tokens,
               "prefill_s": st.time_prefill_s, "gpu_peak_gib": peak}
        ids = torch.tensor(tokenizer.encode(doc, add_special_tokens=False), device=device)
        if n <= full_max:
            try:
                _full_prefill_s(torch, big.model, ids[:2048])  # warm
                torch.cuda.reset_peak_memory_stats()
                full_s[n] = _full_prefill_s(torch, big.model, ids)
                row.update(full_prefill_s=full_s[n], full_measured=True,
                           full_gpu_peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
        if "full_prefill_s" not in row and len(full_s) >= 2:
            (n1, t1), (n2, t2) = sorted(full_s.items())[-2:]
            # t = a n + b n^2 through the two longest measured points.
            b = (t2 / n2 - t1 / n1) / (n2 - n1)
            a = t1 / n1 - b * n1
            row.update(full_prefill_s=a * n + b * n * n, full_measured=False)
        if "full_prefill_s" in row:
            row["speedup"] = row["full_prefill_s"] / row["prefill_s"]
        rows.append(row)
        print(f"8B-shaped {n}: ParallelComp prefill {row['prefill_s']:.3f} s; full attention "
              f"{row.get('full_prefill_s', float('nan')):.3f} s ({'measured' if row.get('full_measured') else 'extrapolated'}"
              f"); {row.get('speedup', float('nan')):.1f}x", flush=True)
        _save(out_path, rows)
    return {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": rows}


def _save(path: str, rows: list) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"rows": rows}, f, indent=1)


def plot(result: dict, path: str) -> None:
    """Two panels, log-log: prefill seconds (with the linear floor) and peak RSS against document tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["tokens"])
        xs = [r["tokens"] for r in sel]
        ax_t.plot(xs, [r["prefill_s"] + r["question_s"] for r in sel], "o-", label=method)
        ax_m.plot(xs, [r["peak_rss_bytes"] / 2**30 for r in sel], "o-", label=method)
    floor = sorted({(r["tokens"], r["linear_floor_s"]) for r in rows if r["method"] == "parallelcomp"})
    if floor:
        ax_t.plot([f[0] for f in floor], [f[1] for f in floor], "k--", lw=1, label="linear floor (whole document)")
    for ax, title, unit in ((ax_t, "prefill + question pass", "seconds"), (ax_m, "peak RSS", "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("document tokens")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = result.get("machine", {})
    # Each row's own probe (results from older versions of this script kept one probe under "machine").
    rates = [r["gemm_gflops"] for r in rows if "gemm_gflops" in r] or [m.get("gemm_gflops", 0)]
    fig.suptitle(f"SmolLM2-135M, CPU, {m.get('threads', '?')} threads, GEMM "
                 f"{min(rates):.0f}-{max(rates):.0f} GFLOP/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="8000,16000,32000,64000,128000")
    p.add_argument("--methods", default="parallelcomp,truncate,hf_full")
    p.add_argument("--hf-max", type=int, default=16000, help="longest document for hf_full")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", default="results/e2e.json")
    p.add_argument("--plot", default=None, help="also write a PNG of time and memory against length")
    p.add_argument("--plot-only", default=None, metavar="JSON", help="redraw --plot from an earlier results file")
    p.add_argument("--breakdown", action="store_true",
                   help="also profile a second prefill per ParallelComp row: seconds in the linear GEMMs, the "
                        "attention kernel and all other ops, each as a multiple of the floor")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="ParallelComp chunk length (default: the package default)")
    p.add_argument("--dtypes", default="auto",
                   help="comma-separated precisions to run ParallelComp and truncate in (auto, float32, bfloat16); "
                        "hf_full always runs float32")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "TOKENS"), help=argparse.SUPPRESS)
    p.add_argument("--gpu-headline", action="store_true",
                   help="on a CUDA GPU: the bundled model and an 8B-shaped model, ParallelComp against full attention")
    p.add_argument("--full-max", type=int, default=131072, help="longest document full attention is run at")
    args = p.parse_args()
    if args.gpu_headline:
        result = gpu_headline([int(x) for x in args.lengths.split(",")], args.out, args.full_max)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return 0
    if args.chunk_tokens is not None and args.chunk_tokens < 1:
        p.error(f"--chunk-tokens {args.chunk_tokens}: must be >= 1")
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.max_new_tokens, args.breakdown, args.chunk_tokens,
                                 args.dtypes)))
        return 0
    if args.plot_only:
        plot(json.load(open(args.plot_only)), args.plot or os.path.splitext(args.plot_only)[0] + ".png")
        return 0
    import torch

    from parallelcomp_triton.bundled import bundled_model_dir

    cfg = json.load(open(os.path.join(bundled_model_dir(), "config.json")))
    h, i, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv_dim = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    non_embedding = n_layers * (2 * h * h + 2 * h * kv_dim + 3 * h * i)
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        for method in args.methods.split(","):
            if method == "hf_full" and n > args.hf_max:
                continue
            for dtype in args.dtypes.split(",") if method != "hf_full" else ["float32"]:
                proc = subprocess.run([sys.executable, __file__, "--one", method, str(n), "--dtypes", dtype,
                                       "--max-new-tokens", str(args.max_new_tokens)] + ["--breakdown"] * args.breakdown
                                      + ["--chunk-tokens", str(args.chunk_tokens)] * (args.chunk_tokens is not None),
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{method} {n} {dtype}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                floor = lambda rate: 2 * non_embedding * row["document_tokens"] / (rate * 1e9)  # noqa: E731
                row["linear_floor_s"] = floor(row["gemm_gflops"])
                for name in PROBE_DTYPES:
                    row[f"linear_floor_{name}_s"] = floor(row[f"gemm_gflops_{name}"])
                row["prefill_over_floor"] = row["prefill_s"] / row["linear_floor_s"]
                row["prefill_over_mlp_floor"] = row["prefill_s"] * row["gemm_mlp_gflops"] / row["gemm_gflops"] / row["linear_floor_s"]
                rows.append(row)
                print(f"{method:>12} {n:>7} {row['dtype']}: prefill {row['prefill_s']:.1f} s ({row['prefill_over_floor']:.2f}x "
                      f"floor), GEMM {row['gemm_gflops']:.1f} GFLOP/s, decode {row['decode_ms_per_token']:.1f} ms/token, "
                      f"RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    # No machine-wide GEMM rate: each row carries the probes taken in its own process, right before it.
    result = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
              "non_embedding_params": non_embedding, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    print(f"{torch.get_num_threads()} threads; GEMM rates probed in each row's own process, in float32 and bf16\n")
    print("| method | dtype | tokens | chunks | prefill s | GEMM GFLOP/s fp32 / bf16 | x fp32 floor | x bf16 floor | "
          "question s | decode ms/token | peak RSS GiB | KV MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r.get('dtype', 'float32')} | {r['document_tokens']} | {r['chunks']} | {r['prefill_s']:.1f} | "
              f"{r['gemm_gflops_float32']:.1f} / {r['gemm_gflops_bfloat16']:.1f} | "
              f"{r['prefill_s'] / r['linear_floor_float32_s']:.2f} | {r['prefill_s'] / r['linear_floor_bfloat16_s']:.2f} | "
              f"{r['question_s']:.2f} | {r['decode_ms_per_token']:.1f} | "
              f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['kv_cache_bytes'] / 2**20:.1f} |")
    broken = [r for r in rows if "breakdown" in r]
    if broken:
        print("\nProfiled prefill (a second run under torch.profiler), self CPU seconds and multiples of the floor:\n")
        print("| method | dtype | tokens | profiled prefill s | linear GEMMs | attention kernel | other ops | not in ops |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in broken:
            b, f = r["breakdown"], r["linear_floor_s"]
            rest = b["profiled_prefill_s"] - b["linear_s"] - b["attention_s"] - b["other_ops_s"]
            cells = [f"{s:.1f} s ({s / f:.2f}x)" for s in (b["linear_s"], b["attention_s"], b["other_ops_s"], rest)]
            print(f"| {r['method']} | {r.get('dtype', 'float32')} | {r['document_tokens']} | {b['profiled_prefill_s']:.1f} | "
                  + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
