"""Command line: answer a question about a long document, or many.

    python -m parallelcomp_triton.run --input doc.txt --question "What is the pass key?"
    python -m parallelcomp_triton.run --demo            # passkey retrieval beyond the trained window
    python -m parallelcomp_triton.run --input-jsonl questions.jsonl > answers.jsonl
    python -m parallelcomp_triton.run --input doc.txt --questions questions.txt --save-encoding doc.enc
    python -m parallelcomp_triton.run --encoding doc.enc --question "And who wrote it?"
    torchrun --nproc-per-node 2 -m parallelcomp_triton.run --input doc.txt --question "..." --distributed

The answer goes to stdout, a progress bar over chunks to stderr; --json prints one object with the answer
and the stats. Bad input prints one line to stderr and exits with code 2.

--input-jsonl reads one JSON object per line with "context" and "question" (and optionally "id"), answers
`--batch-docs` documents at a time with generate_batch and writes one JSON object per input line to stdout,
in input order: {"line": N, "id": ..., "answer": ...}. A bad line (invalid JSON, a missing or empty field,
a question that does not fit the window) gets {"line": N, "error": "..."} and a one-line message on
stderr; the other lines are still answered, and the exit code is 2.

Many questions about one document: --question may be repeated, or --questions FILE gives one per line;
the document is then encoded once (each chunk's K/V, question-independent) and every question runs only the
question-dependent work over it. Answers are printed in order, one per line (line breaks inside an answer
become spaces; --json prints one JSON object per question instead). --save-encoding DIR keeps the encoding;
--encoding DIR answers from a saved one instead of --input, with its chunking, prompt and batch settings
(--chunk-tokens, --template, --instruction, --window, --batch-chunks are the encoding's) and, under
--dtype auto, its dtype.

One question over several documents: repeat --input (or --encoding); their chunks are ranked together by
the question's NLL and the best --keep-chunks are kept whichever documents they come from (the stats'
chunk_documents tells which).

--distributed (under torchrun): every rank loads the model and prefills its share of the chunks; rank 0
gathers the K best compressed chunk caches, answers and prints; the other ranks print nothing. With
--save-encoding or --encoding, each rank encodes (or reads) its share of the chunks in that one directory,
which every rank must see (one host, or a shared file system).
"""
from __future__ import annotations

import json
import os
import sys

from .cli import (Parser, add_model_options, add_settings_options, cli_main, config_from_args, empty_answer_warning,
                  read_document, read_input_bytes)
from .errors import ParallelCompError
from .jsonl import Job, answer_jsonl, read_jsonl


def build_parser() -> Parser:
    p = Parser(prog="python -m parallelcomp_triton.run", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", action="append",
                     help="document file (UTF-8), or - for stdin; repeat it to ask about several documents at once")
    src.add_argument("--input-jsonl", metavar="FILE",
                     help="one JSON object per line with context, question (and id); - for stdin")
    src.add_argument("--encoding", metavar="DIR", action="append",
                     help="answer from a document encoded before (--save-encoding) instead of --input")
    src.add_argument("--demo", action="store_true",
                     help="build a passkey document (--demo-tokens long) and answer it: the bundled model's main job")
    p.add_argument("--demo-tokens", type=int, default=16000, help="length of the --demo document in tokens")
    p.add_argument("--question", action="append",
                   help="the question (required with --input or --encoding); repeat it for several questions")
    p.add_argument("--questions", metavar="FILE", help="more questions, one per line")
    p.add_argument("--save-encoding", metavar="DIR",
                   help="with --input: encode the document once, save it in DIR, then answer")
    add_model_options(p, device=True)
    add_settings_options(p)
    p.add_argument("--batch-docs", type=int, default=8, help="documents answered together with --input-jsonl")
    p.add_argument("--distributed", action="store_true",
                   help="spread the chunk prefill over torchrun's ranks (gloo on CPU, nccl on GPUs)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the answer and the stats")
    p.add_argument("--stream", action="store_true",
                   help="print the answer as it is decoded (the default when stdout is a terminal)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    # Under --distributed only rank 0 speaks: every rank meets the same bad input, one line is enough.
    return cli_main(argv, build_parser, _main,
                    quiet=lambda args: args.distributed and os.environ.get("RANK", "0") != "0")


def _checked_config(args):
    """The config, once the input options are known to fit together."""
    if args.input is None and args.input_jsonl is None and not args.demo and args.encoding is None:
        raise ParallelCompError("give --input FILE (or - for stdin) and --question, --input-jsonl FILE, "
                                "--encoding DIR and --question, or --demo")
    for source in ("input", "encoding"):
        if getattr(args, source) is not None and not args.question and not args.questions:
            raise ParallelCompError(f"--question is required with --{source}")
    if args.input_jsonl is not None and (args.question or args.questions):
        raise ParallelCompError("--question is not used with --input-jsonl (every line has its own question)")
    if args.demo and (args.questions or len(args.question or []) > 1):
        raise ParallelCompError("--demo answers one question")
    if args.save_encoding is not None and (args.input is None or len(args.input) > 1):
        raise ParallelCompError("--save-encoding needs one --input (the document to encode)")
    if args.batch_docs < 1:
        raise ParallelCompError(f"--batch-docs {args.batch_docs}: must be >= 1")
    if args.demo_tokens < 100:
        raise ParallelCompError(f"--demo-tokens {args.demo_tokens}: must be >= 100")
    if args.demo and not args.instruction:
        from .tasks import PASSKEY_INSTRUCTION

        return config_from_args(args, instruction=PASSKEY_INSTRUCTION)  # the passkey task's own instruction
    return config_from_args(args)


def read_questions(args) -> list[str]:
    """--question (repeatable) then the lines of --questions FILE (blank lines skipped)."""
    questions = list(args.question or [])
    if args.questions is not None:
        data = read_input_bytes(args.questions)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ParallelCompError(f"{args.questions}: not UTF-8 text (bad byte at offset {e.start})") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise ParallelCompError(f"{args.questions}: no questions")
        questions += lines
    return questions


def _read_jobs(args) -> list[Job]:
    """The documents to answer (--input: one job per question, sharing the document; --encoding: the
    questions, without a context); --demo builds its document later, once the tokenizer is loaded."""
    if args.input_jsonl is not None:
        return read_jsonl(args.input_jsonl)
    if args.input is not None or args.encoding is not None:
        context = None
        if args.input is not None:
            texts = [read_document(path) for path in args.input]
            context = texts[0] if len(texts) == 1 else texts  # several: one ranking over all their chunks
        return [Job(n, context=context, question=q) for n, q in enumerate(read_questions(args), start=1)]
    return []


def _device(args) -> str:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParallelCompError(f"--device {device}: CUDA is not available on this machine")
    return device


def _demo_job(pc, args) -> tuple[Job, str]:
    from .tasks import passkey_case

    # The question as a user types it (no answer cue, no task instruction): what the defaults are chosen for.
    case = passkey_case(pc.tokenizer, args.demo_tokens, depth=0.6, seed=args.seed or 0, question="natural")
    return Job(1, context=case.context, question=(args.question or [case.question])[0]), case.answer


def _main(args) -> int:
    from .pipeline import ParallelComp

    cfg = _checked_config(args)
    if args.distributed:
        return _main_distributed(args, cfg)
    jobs = _read_jobs(args)
    dtype = args.dtype
    if args.encoding is not None:
        from .storage import read_meta

        meta = [read_meta(path) for path in args.encoding][0]  # a bad directory fails before the model loads
        if dtype == "auto":
            dtype = meta["dtype"]  # the encoding's precision
    pc = ParallelComp.from_pretrained(args.model, dtype=dtype, device=_device(args), backend=args.backend)
    if dtype != args.dtype:
        pc.dtype_source = "auto: the encoding's dtype"
    if args.input_jsonl is not None:
        return answer_jsonl(pc, jobs, cfg, args)
    if args.encoding is not None or args.save_encoding is not None or len(jobs) > 1:
        return answer_encoded(pc, jobs, cfg, args)
    expected = None
    if args.demo:
        job, expected = _demo_job(pc, args)
    else:
        job = jobs[0]
    if not args.json and (args.stream or sys.stdout.isatty()):
        res = _stream_answer(pc, job, cfg, args)
        _print_answer(res, args, expected, printed=True)
        return 0
    res = pc.generate(job.context, job.question, config=cfg, progress=not args.no_progress)
    _print_answer(res, args, expected)
    return 0


def _stream_answer(pc, job: Job, cfg, args):
    """Print the answer as it is decoded (leading blanks dropped, as the printed answer strips them)."""
    stream = pc.stream(job.context, job.question, config=cfg, progress=not args.no_progress)
    started = False
    for piece in stream:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    return stream.result


def check_questions_fit(pc, cfg, jobs: list[Job]) -> None:
    """The window checks that need no document, for every question, before the (long) encoding."""
    for job in jobs:
        pc.plan("x", job.question, cfg)


def answer_encoded(pc, jobs: list[Job], cfg, args) -> int:
    """Many questions about one document: encode it once (or load --encoding), then answer every question
    over the encoding, printing each answer as it comes."""
    encodings = []
    try:
        if args.encoding is not None:
            encodings = [pc.load_encoded(path) for path in args.encoding]
            cfg = encodings[0].config(cfg)  # chunk, prompt and batch as the encoding did
        else:
            check_questions_fit(pc, cfg, jobs)
            texts = jobs[0].context if isinstance(jobs[0].context, list) else [jobs[0].context]
            for text in texts:
                encodings.append(pc.encode(text, cfg, path=args.save_encoding, progress=not args.no_progress))
        context = encodings[0] if len(encodings) == 1 else encodings
        for job in jobs:  # every question checked (fits the window, ...) before the first is answered
            pc.plan(context, job.question, cfg)
        for job in jobs:
            res = pc.generate(context, job.question, config=cfg, progress=not args.no_progress)
            _print_answer(res, args, None, question=job.question, one_line=len(jobs) > 1,
                          number=job.line if len(jobs) > 1 else None)
    finally:
        for encoded in encodings:
            encoded.close()  # removes a temporary encoding; a saved one stays
    return 0


def _print_answer(res, args, expected, question=None, one_line=False, number=None, printed=False) -> None:
    """The answer (unless `printed` already, streamed) and the demo's line, or the JSON object."""
    if res.stats.empty_answer:
        print(empty_answer_warning(res.stats, f"question {number}: " if number is not None else ""), file=sys.stderr)
    if args.json:
        out = {"answer": res.text, "token_ids": res.token_ids, "stats": res.stats.as_dict()}
        if question is not None:
            out = {"question": question, **out}
        if expected is not None:
            out["expected"] = expected
        print(json.dumps(out), flush=True)
    else:
        if not printed:
            print(" ".join(res.text.splitlines()).strip() if one_line else res.text.strip(), flush=True)
        if expected is not None:
            st, ok = res.stats, expected in res.text
            print(f"[demo] {st.document_tokens} document tokens, {len(st.chunk_spans)} chunks, kept {st.kept_chunks}, "
                  f"KV {st.kv_tokens_per_layer_before} -> {st.kv_tokens_per_layer_after} tokens/layer, "
                  f"{st.time_total_s:.1f} s; expected pass key {expected}: {'found' if ok else 'NOT found'}",
                  file=sys.stderr)


def _main_distributed(args, cfg) -> int:
    from .distributed import encode_distributed, generate_distributed, init_distributed, on_every_rank
    from .pipeline import ParallelComp
    from .storage import read_meta

    ctx = init_distributed(args.device)
    together = False
    try:
        # Rank 0 reads the input and shares it, so only rank 0's host needs the file.
        payload = None
        if ctx.rank == 0:
            try:
                payload = ("jobs", _read_jobs(args))
            except ParallelCompError as e:
                payload = ("error", str(e))
        kind, value = ctx.broadcast(payload)
        if kind == "error":
            raise ParallelCompError(value)
        jobs = value
        dtype = args.dtype
        if args.encoding is not None and dtype == "auto":
            # The encodings' precision; every rank must read them, and a bad one fails before the model loads.
            dtype = on_every_rank(ctx, lambda: [read_meta(p) for p in args.encoding])[0]["dtype"]
        pc = ParallelComp.from_pretrained(args.model, dtype=dtype, device=ctx.device, backend=args.backend)
        progress = ctx.rank == 0 and not args.no_progress

        def generate_batch(pairs):
            return generate_distributed(pc, ctx, pairs, config=cfg, progress=progress, return_errors=True)

        if args.input_jsonl is not None:  # every rank runs the same batches; rank 0 prints
            code = answer_jsonl(pc, jobs, cfg, args, generate_batch, speak=ctx.rank == 0)
        else:
            expected = None
            if args.demo:  # every rank builds the same document from the same seed
                job, expected = _demo_job(pc, args)
                jobs = [job]
            # Several questions (--question repeated, --questions): one generate_batch over the pairs.
            encoded = None
            if args.encoding is not None:  # each rank reads its share of the chunks from them
                encodings = on_every_rank(ctx, lambda: [pc.load_encoded(p) for p in args.encoding])
                cfg = encodings[0].config(cfg)  # chunk, prompt and batch as the encoding did
                encoded = encodings[0] if len(encodings) == 1 else encodings
            elif args.save_encoding is not None:
                check_questions_fit(pc, cfg, jobs)
                encoded = encode_distributed(pc, ctx, jobs[0].context, args.save_encoding, cfg, progress)
            pairs = [(job.context if encoded is None else encoded, job.question) for job in jobs]
            results = generate_distributed(pc, ctx, pairs, config=cfg, progress=progress)
            if ctx.rank == 0:
                for job, res in zip(jobs, results):
                    _print_answer(res, args, expected, question=job.question if len(jobs) > 1 else None,
                                  one_line=len(jobs) > 1, number=job.line if len(jobs) > 1 else None)
            code = 0
        together = True
        return code
    except ParallelCompError:
        together = True  # bad input or settings: every rank checks the same things and fails alike
        raise
    finally:
        ctx.close(together)


if __name__ == "__main__":
    sys.exit(main())
