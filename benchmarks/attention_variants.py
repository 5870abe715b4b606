"""CPU attention variants for the prefill's causal chunk attention, side by side in one process.

    python benchmarks/attention_variants.py [--chunks 4 --tokens 1040] [--no-flex]

Shapes are the bundled model's (9 query heads, 3 KV heads, d 64) on `--chunks` causal chunks of `--tokens`.
Variants: PyTorch SDPA (the CPU flash kernel the torch path uses) in float32 and bf16; a blocked bf16
attention built on bmm, with float32 scores (QK^T in float32: torch has no CPU GEMM with bf16 inputs and
float32 output) or with bf16-rounded scores; FlexAttention under torch.compile (compile time reported). Prints
the median time of 5 repeats, GFLOP/s (4 * chunks * heads * d * causal pairs) and the max error against a
float64 SDPA of the same inputs. Never asserts.
"""
from __future__ import annotations

import argparse
import math
import time

import torch


from kernel_bench import make_timer  # benchmarks/ is on sys.path when this script runs

# One warm-up call, median of 5 (the same timer as the kernel microbenchmarks).
cpu_timer = make_timer(torch.device("cpu"), repeats=5, warmup=1)


def sdpa(q, k, v):
    group = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                                            v.repeat_interleave(group, 1), is_causal=True)


def blocked(q, k, v, fp32_scores: bool, block: int = 128):
    """Causal attention in query blocks: all keys a block sees at once (exact softmax, no online rescaling),
    the GQA group's heads stacked into one bmm per KV head."""
    chunks, heads, length, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    scale = 1 / math.sqrt(d)
    out = torch.empty_like(q)
    for b in range(chunks):
        qg = q[b].view(kv_heads, group, length, d)
        for r0 in range(0, length, block):
            r1 = min(length, r0 + block)
            qq = qg[:, :, r0:r1].reshape(kv_heads, group * (r1 - r0), d)
            kk, vv = k[b, :, :r1], v[b, :, :r1]
            s = torch.bmm(qq.float(), kk.float().transpose(1, 2)) if fp32_scores else \
                torch.bmm(qq, kk.transpose(1, 2)).float()
            s = s.view(kv_heads, group, r1 - r0, r1)
            s[..., r0:r1].masked_fill_(torch.ones(r1 - r0, r1 - r0, dtype=torch.bool).triu_(1), float("-inf"))
            p = torch.softmax(s.mul_(scale), dim=-1).to(q.dtype).view(kv_heads, group * (r1 - r0), r1)
            out[b].view(kv_heads, group, length, d)[:, :, r0:r1] = torch.bmm(p, vv).view(kv_heads, group, r1 - r0, d)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1040)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes ~30 s)")
    args = p.parse_args()
    torch.manual_seed(0)
    b, h, h_kv, n, d = args.chunks, 9, 3, args.tokens, 64
    flops = 4 * b * h * d * n * (n + 1) / 2
    q32, k32, v32 = torch.randn(b, h, n, d), torch.randn(b, h_kv, n, d), torch.randn(b, h_kv, n, d)
    qb, kb, vb = q32.bfloat16(), k32.bfloat16(), v32.bfloat16()
    ref = sdpa(q32.double(), k32.double(), v32.double())
    variants = [("SDPA float32", lambda: sdpa(q32, k32, v32)), ("SDPA bf16", lambda: sdpa(qb, kb, vb)),
                ("blocked bf16, float32 scores", lambda: blocked(qb, kb, vb, True)),
                ("blocked bf16, bf16 scores", lambda: blocked(qb, kb, vb, False))]
    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(lambda b_, h_, i, j: i >= j, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu")
        flex = torch.compile(flex_attention, dynamic=False)
        for name, (qq, kk, vv) in (("bf16", (qb, kb, vb)), ("float32", (q32, k32, v32))):
            t = time.perf_counter()
            flex(qq, kk, vv, block_mask=mask, enable_gqa=True)
            print(f"FlexAttention {name}: compile + first call {time.perf_counter() - t:.1f} s")
            variants.append((f"FlexAttention {name} (compiled)",
                             lambda qq=qq, kk=kk, vv=vv: flex(qq, kk, vv, block_mask=mask, enable_gqa=True)))
    print(f"\n{b} chunks x {h} heads ({h_kv} KV) x {n} tokens x d {d}, causal; {torch.get_num_threads()} threads\n")
    print("| variant | ms | GFLOP/s | max abs error vs float64 |")
    print("|---|---:|---:|---:|")
    for name, fn in variants:
        t, _ = cpu_timer(fn)
        err = (fn().double() - ref).abs().max().item()
        print(f"| {name} | {t * 1e3:.1f} | {flops / t / 1e9:.1f} | {err:.1e} |")


if __name__ == "__main__":
    main()
