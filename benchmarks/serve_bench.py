"""The server under load: N follow-up questions about stored documents, asked one by one and all at once.

    python benchmarks/serve_bench.py --tokens 32000 --docs 2 --questions 8 --out benchmarks/results/serve.json
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --api-key KEY     # a server already running

Starts `python -m parallelcomp_triton.serve` (the bundled model unless --model; store --store, by default a
temporary directory; each extra argument after `--` goes to the server) on a free localhost port, stores
--docs NIAH documents of --tokens tokens (parallelcomp_triton.tasks, natural questions; a document already in
the store is not encoded again), then asks --questions questions spread over them (each document's own NIAH
question and general follow-ups, max_tokens 12, greedy):

  sequential  one client, each question sent when the previous answer has come (what a queue of one
              answers: `generate` per question)
  concurrent  --questions clients at once: the server answers the questions waiting together
              (`generate_batch`, up to its --max-batch)

Prints per mode the wall time, throughput (questions/s) and per-question latency p50/p95 (request sent to
answer received), and whether every concurrent answer equals the sequential one. Never asserts timings.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLLOW_UPS = ["What is the main topic of the text above?", "Who is the author of the text above?",
              "Summarize the text above in one sentence."]


def call(url: str, key: str | None, method: str, path: str, body=None, timeout: float = 3600):
    req = urllib.request.Request(url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def start_server(args, store: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "parallelcomp_triton.serve", "--store", store, "--port", str(port),
           "--log-level", "warning", *(["--model", args.model] if args.model else []), *args.server_args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            call(url, None, "GET", "/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not start in 5 minutes")


def ask(url, key, doc_id, question, max_tokens) -> tuple[float, str]:
    t = time.perf_counter()
    out = call(url, key, "POST", "/v1/chat/completions",
               {"model": "any", "messages": [{"role": "user", "content": question}], "documents": [doc_id],
                "max_tokens": max_tokens, "temperature": 0})
    return time.perf_counter() - t, out["choices"][0]["message"]["content"]


def summary(name: str, wall: float, latencies: list[float]) -> dict:
    q = sorted(latencies)
    pct = lambda p: q[min(len(q) - 1, round(p * (len(q) - 1)))]  # noqa: E731
    return {"mode": name, "questions": len(q), "wall_s": round(wall, 2), "questions_per_s": round(len(q) / wall, 3),
            "p50_s": round(statistics.median(q), 2), "p95_s": round(pct(0.95), 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory or Hub id (default: the bundled SmolLM2-135M)")
    p.add_argument("--url", default=None, help="use this running server instead of starting one")
    p.add_argument("--api-key", default=None)
    p.add_argument("--store", default=None, help="the started server's store (default: a temporary directory)")
    p.add_argument("--tokens", type=int, default=32000)
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("server_args", nargs="*", help="after --: more options for the server")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from parallelcomp_triton.loading import resolve_model_dir
    from parallelcomp_triton.tasks import niah_case

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(args.model)))
    cases = [niah_case(tokenizer, args.tokens, depth=0.2 + 0.6 * i / max(1, args.docs - 1), seed=5 + i,
                       question="natural") for i in range(args.docs)]
    proc, tmp = None, None
    if args.url is None:
        store = args.store or (tmp := tempfile.mkdtemp(prefix="serve-bench-"))
        proc, url = start_server(args, store)
    else:
        url = args.url.rstrip("/")
    try:
        ids, encode_s = [], []
        for case in cases:
            t = time.perf_counter()
            info = call(url, args.api_key, "POST", "/v1/documents", {"text": case.context})
            encode_s.append(round(time.perf_counter() - t, 2))
            ids.append(info["id"])
            print(f"document {info['id']}: {info['tokens']} tokens, {info['chunks']} chunks, "
                  f"{'encoded' if info['encoded'] else 'already stored'} in {encode_s[-1]} s", file=sys.stderr)
        # question i: about document i mod D; its NIAH question first, then the follow-ups in turn
        asks = [(ids[i % len(ids)], ([cases[i % len(ids)].question] + FOLLOW_UPS)[(i // len(ids)) % (1 + len(FOLLOW_UPS))])
                for i in range(args.questions)]
        ask(url, args.api_key, ids[0], "Warm up?", 2)

        t = time.perf_counter()
        seq = [ask(url, args.api_key, doc, q, args.max_tokens) for doc, q in asks]
        seq_wall = time.perf_counter() - t

        t = time.perf_counter()
        with ThreadPoolExecutor(len(asks)) as pool:
            conc = list(pool.map(lambda a: ask(url, args.api_key, a[0], a[1], args.max_tokens), asks))
        conc_wall = time.perf_counter() - t
        health = call(url, args.api_key, "GET", "/health")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    rows = [summary("sequential", seq_wall, [s for s, _ in seq]), summary("concurrent", conc_wall, [s for s, _ in conc])]
    same = [a == b for (_, a), (_, b) in zip(seq, conc)]
    print("| mode | questions | wall s | questions/s | p50 s | p95 s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['questions']} | {r['wall_s']} | {r['questions_per_s']} | {r['p50_s']} | {r['p95_s']} |")
    print(f"\n{args.docs} documents of {args.tokens} tokens (encoded in {encode_s} s); concurrent answers equal to the "
          f"sequential ones: {sum(same)}/{len(same)}; largest batch {health.get('largest_batch')}")
    for (doc, q), (_, a) in zip(asks, seq):
        print(f"  {doc} {q!r}: {a!r}", file=sys.stderr)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"tokens": args.tokens, "docs": args.docs, "encode_s": encode_s, "rows": rows,
                       "equal": sum(same), "largest_batch": health.get("largest_batch"),
                       "answers": [{"document": d, "question": q, "answer": a} for (d, q), (_, a) in zip(asks, seq)]},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
