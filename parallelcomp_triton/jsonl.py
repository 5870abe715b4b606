"""--input-jsonl: one JSON object per line with "context" and "question" (and optionally "id"), answered
`--batch-docs` documents at a time with generate_batch, one JSON object written per input line in input
order; a bad line gets its error in its slot and the others are still answered. `Job` is also what run.py
makes of --input and --demo."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from .cli import empty_answer_warning, read_input_bytes
from .errors import ParallelCompError


@dataclass
class Job:
    """One input line of --input-jsonl (or the one document of --input / --demo)."""

    line: int
    context: str | None = None
    question: str | None = None
    id: object = None
    has_id: bool = False
    error: str | None = None  # why the line cannot be answered


def _parse_line(number: int, raw: bytes) -> Job | None:
    """A Job for one JSONL line (None for a blank line); a bad line becomes a Job with `error` set."""
    try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        return Job(number, error=f"not UTF-8 text (bad byte at column {e.start + 1})")
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Job(number, error=f"invalid JSON (column {e.colno}: {e.msg})")
    if not isinstance(obj, dict):
        return Job(number, error=f"expected a JSON object, got {type(obj).__name__}")
    job = Job(number, id=obj.get("id"), has_id="id" in obj)
    for name in ("context", "question"):
        if name not in obj:
            job.error = f"missing field {name!r}"
        elif not isinstance(obj[name], str):
            job.error = f"field {name!r} must be a string, got {type(obj[name]).__name__}"
        elif not obj[name].strip():
            job.error = f"field {name!r} is empty"
        if job.error:
            return job
    job.context, job.question = obj["context"], obj["question"]
    return job


def read_jsonl(path: str) -> list[Job]:
    """Every non-blank line of a JSONL file as a Job, bad lines included (they carry their error)."""
    jobs = [job for number, raw in enumerate(read_input_bytes(path).split(b"\n"), start=1)
            if (job := _parse_line(number, raw)) is not None]
    if not jobs:
        raise ParallelCompError(f"{path}: no JSON lines")
    return jobs


def _jsonl_record(job: Job, result, args, source: str) -> dict:
    """The output object for one input line; a bad line is also reported on stderr."""
    record: dict = {"line": job.line}
    if job.has_id:
        record["id"] = job.id
    error = job.error or (str(result) if isinstance(result, ParallelCompError) else None)
    if error is not None:
        print(f"error: {source}:{job.line}: {error}", file=sys.stderr)
        record["error"] = error
        return record
    record["answer"] = result.text.strip()
    if result.stats.empty_answer:
        record["warning"] = empty_answer_warning(result.stats).removeprefix("warning: ")
        print(empty_answer_warning(result.stats, f"{source}:{job.line}: "), file=sys.stderr)
    if args.json:
        record["token_ids"] = result.token_ids
        record["stats"] = result.stats.as_dict()
    return record


def answer_jsonl(pc, jobs: list[Job], cfg, args, generate_batch=None, speak: bool = True) -> int:
    """Answer the good jobs `--batch-docs` at a time and print one JSON line per job, in input order.
    `generate_batch(pairs) -> results` defaults to pc.generate_batch (the distributed run passes its own;
    its ranks other than 0 run the same batches with speak=False)."""
    source = "<stdin>" if args.input_jsonl == "-" else args.input_jsonl
    if generate_batch is None:
        def generate_batch(pairs):
            return pc.generate_batch(pairs, config=cfg, progress=not args.no_progress, return_errors=True)
    any_bad = False
    pending: list[Job] = []

    def flush():
        nonlocal any_bad
        good = [job for job in pending if job.error is None]
        results = iter(generate_batch([(job.context, job.question) for job in good]) if good else [])
        for job in pending:
            result = next(results) if job.error is None else None
            any_bad |= job.error is not None or isinstance(result, ParallelCompError)
            if speak:
                print(json.dumps(_jsonl_record(job, result, args, source)), flush=True)
        pending.clear()

    for job in jobs:
        pending.append(job)
        if sum(j.error is None for j in pending) >= args.batch_docs:
            flush()
    flush()
    return 2 if any_bad else 0
