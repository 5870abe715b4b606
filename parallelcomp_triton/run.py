"""Command line: answer a question about a long document.

    python -m parallelcomp_triton.run --input doc.txt --question "What is the pass key?"
    python -m parallelcomp_triton.run --demo            # passkey retrieval beyond the trained window

The answer goes to stdout, a progress bar over chunks to stderr; --json prints one object with the answer
and the stats. Bad input prints one line to stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import MODES, TEMPLATES, Calibration, ParallelCompConfig
from .errors import ParallelCompError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage first)
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _budget(value: str):
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = ParallelCompConfig()
    p = _Parser(prog="python -m parallelcomp_triton.run", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", help="document file (UTF-8), or - for stdin")
    src.add_argument("--demo", action="store_true",
                     help="build a passkey document (--demo-tokens long) and answer it: the bundled model's main job")
    p.add_argument("--demo-tokens", type=int, default=16000, help="length of the --demo document in tokens")
    p.add_argument("--question", help="the question (required with --input)")
    p.add_argument("--model", default=None, help="Hugging Face Llama directory (default: bundled SmolLM2-135M)")
    p.add_argument("--mode", choices=MODES, default=d.mode)
    p.add_argument("--template", choices=TEMPLATES, default=d.template)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--keep-chunks", type=int, default=d.keep_chunks, help="K: chunks kept after eviction")
    p.add_argument("--kv-budget", type=_budget, default=d.kv_budget,
                   help="B: KV tokens kept per chunk, layer and KV head, or 'none'")
    p.add_argument("--window", type=int, default=None, help="trained window (default: the model's)")
    p.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens, help="document tokens per chunk")
    p.add_argument("--batch-chunks", type=int, default=d.batch_chunks, help="chunks prefilled together")
    p.add_argument("--score-window", type=int, default=d.score_window, help="w: question rows that score keys")
    p.add_argument("--calibrate", default=None, metavar="REGION:I-J:TAU", help="e.g. sink:3-6:0.1")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the answer and the stats")
    p.add_argument("--no-progress", action="store_true")
    return p


def read_document(path: str) -> str:
    try:
        data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except FileNotFoundError:
        raise ParallelCompError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ParallelCompError(f"{path}: is a directory, expected a text file") from None
    except OSError as e:
        raise ParallelCompError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParallelCompError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.strip():
        raise ParallelCompError(f"{path}: the document is empty")
    return text


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed in one line)
        return int(e.code or 0)
    try:
        return _main(args)
    except ParallelCompError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _main(args) -> int:
    import torch

    from .pipeline import ParallelComp

    if args.input is None and not args.demo:
        raise ParallelCompError("give --input FILE (or - for stdin) and --question, or --demo")
    if args.input is not None and not args.question:
        raise ParallelCompError("--question is required with --input")
    calibration = Calibration.parse(args.calibrate) if args.calibrate else None
    cfg = ParallelCompConfig(mode=args.mode, template=args.template, chunk_tokens=args.chunk_tokens,
                             window=args.window, batch_chunks=args.batch_chunks, keep_chunks=args.keep_chunks,
                             kv_budget=args.kv_budget, score_window=args.score_window, calibration=calibration,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed)
    cfg.check()
    if args.demo_tokens < 100:
        raise ParallelCompError(f"--demo-tokens {args.demo_tokens}: must be >= 100")
    if args.input is not None:
        context, question, expected = read_document(args.input), args.question, None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParallelCompError(f"--device {device}: CUDA is not available on this machine")
    pc = ParallelComp.from_pretrained(args.model, dtype=args.dtype, device=device, backend=args.backend)
    if args.demo:
        from .tasks import passkey_case

        case = passkey_case(pc.tokenizer, args.demo_tokens, depth=0.5, seed=args.seed or 0)
        context, question, expected = case.context, args.question or case.question, case.answer
    res = pc.generate(context, question, config=cfg, progress=not args.no_progress)
    if args.json:
        out = {"answer": res.text, "token_ids": res.token_ids, "stats": res.stats}
        if expected is not None:
            out["expected"] = expected
        print(json.dumps(out))
    else:
        print(res.text.strip())
        if expected is not None:
            ok = expected in res.text
            print(f"[demo] {res.stats['document_tokens']} document tokens, {len(res.stats['chunk_spans'])} chunks, "
                  f"kept {res.stats['kept_chunks']}, KV {res.stats['kv_tokens_per_layer_before']} -> "
                  f"{res.stats['kv_tokens_per_layer_after']} tokens/layer, {res.stats['time_total_s']:.1f} s; "
                  f"expected pass key {expected}: {'found' if ok else 'NOT found'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
