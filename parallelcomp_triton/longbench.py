"""LongBench-format evaluation: prompts, generation and the standard LongBench metrics. Its command line is
parallelcomp_triton.evaluate's `longbench`:

    python -m parallelcomp_triton.evaluate longbench --data hotpotqa.jsonl [--dataset hotpotqa] [--limit 20] \\
        [--mode parallelcomp|full|truncate] [--keep-chunks K] [--kv-budget B] [--json results/lb.json]

Input: LongBench JSONL, one object a line with `context`, `input` (may be empty), `answers` (list of
strings), `all_classes` (list, for trec) and optionally `length` (words, LongBench-E buckets) and `dataset`.
The dataset of a record is its `dataset` field, else --dataset, else the file name (LongBench ships
`hotpotqa.jsonl`, ...); with --dataset, records whose field names another task are skipped. LongBench-E
names (`hotpotqa_e`) score as their base dataset.

Scoring follows LongBench's metrics.py: each prediction scores the max over its reference answers, the
dataset score is the mean x 100. trec, triviaqa and samsum score only the prediction's first line. QA F1 on
SQuAD-normalised tokens; ROUGE-L F1 from `rouge-score` (no stemming); classification and retrieval and count
accuracy as LongBench computes them; code edit similarity with `rapidfuzz.fuzz.ratio` (the same Indel
ratio as fuzzywuzzy's, unrounded). Two deliberate differences: LongBench's ROUGE-L comes from the `rouge`
package (summary-level LCS), and its classification fallback (difflib) is unreachable code there, so no
class named in the prediction scores 0 here as it does there.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import string
import time
from collections import Counter
from dataclasses import dataclass

from .cli import read_input_bytes
from .errors import ParallelCompError


@dataclass(frozen=True)
class Task:
    prompt: str  # LongBench's template: {context} then, optionally, {input}
    metric: str
    max_new_tokens: int
    first_line: bool = False  # score only the first line of the prediction
    chat: bool = True  # LongBench wraps the prompt in the chat template (not for few-shot and code tasks)


_QA_PASSAGES = ("Answer the question based on the given passages. Only give me the answer and do not output any "
                "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
                "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
                "Answer:")
_QASPER_RULES = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
                 "answered based on the information in the article, write \"unanswerable\". If the question is a "
                 "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.")

# The 16 English LongBench tasks: prompt templates (LongBench's config/dataset2prompt.json), metric and
# output length (config/dataset2maxlen.json).
TASKS: dict[str, Task] = {
    "narrativeqa": Task(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", "qa_f1", 128),
    "qasper": Task(
        f"You are given a scientific article and a question. Answer the question {_QASPER_RULES}\n\nArticle: "
        f"{{context}}\n\n Answer the question based on the above article {_QASPER_RULES}\n\nQuestion: {{input}}"
        f"\n\nAnswer:", "qa_f1", 128),
    "multifieldqa_en": Task(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        "qa_f1", 64),
    "hotpotqa": Task(_QA_PASSAGES, "qa_f1", 32),
    "2wikimqa": Task(_QA_PASSAGES, "qa_f1", 32),
    "musique": Task(_QA_PASSAGES, "qa_f1", 32),
    "gov_report": Task(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:", "rouge_l", 512),
    "qmsum": Task(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", "rouge_l", 512),
    "multi_news": Task(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, "
        "write a one-page summary of all the news.\n\nSummary:", "rouge_l", 512),
    "trec": Task("Please determine the type of the question below. Here are some examples of questions.\n\n"
                 "{context}\n{input}", "classification", 64, first_line=True, chat=False),
    "triviaqa": Task("Answer the question based on the given passage. Only give me the answer and do not output any "
                     "other words. The following are some examples.\n\n{context}\n\n{input}", "qa_f1", 32,
                     first_line=True, chat=False),
    "samsum": Task("Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
                   "{context}\n\n{input}", "rouge_l", 128, first_line=True, chat=False),
    "passage_count": Task(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ", "count", 32),
    "passage_retrieval_en": Task(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        "the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
        "etc.\n\nThe answer is: ", "retrieval", 32),
    "lcc": Task("Please complete the code given below. \n{context}Next line of code:\n", "code_sim", 64, chat=False),
    "repobench-p": Task("Please complete the code given below. \n{context}{input}Next line of code:\n", "code_sim", 64,
                        chat=False),
}

LENGTH_BUCKETS = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, None))  # LongBench-E, in words


# --------------------------------------------------------------------------------------------------
# Metrics (prediction, one reference) -> [0, 1]
# --------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_f1_score(prediction: str, reference: str, **_) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_ROUGE = None


def rouge_l_score(prediction: str, reference: str, **_) -> float:
    global _ROUGE
    if _ROUGE is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise ParallelCompError("ROUGE-L needs rouge-score (pip install 'parallelcomp-triton[eval]')") from None
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def classification_score(prediction: str, reference: str, all_classes=(), **_) -> float:
    """1 / (number of classes named in the prediction) when the reference is one of them, else 0. A named
    class that is a proper substring of the reference ("City" in "Other city") does not count."""
    named = [c for c in all_classes if c in prediction]
    named = [c for c in named if not (c in reference and c != reference)]
    return 1.0 / len(named) if reference in named else 0.0


def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction that are the reference's paragraph number."""
    match = re.search(r"Paragraph (\d+)", reference)
    target = match.group(1) if match else next(iter(re.findall(r"\d+", reference)), None)
    return _number_share(prediction, target) if target is not None else 0.0


def count_score(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction that equal the reference count."""
    return _number_share(prediction, str(reference).strip())


def code_sim_score(prediction: str, reference: str, **_) -> float:
    """Indel similarity of the first prediction line that is not a comment or a code fence."""
    try:
        from rapidfuzz import fuzz
    except ImportError:
        raise ParallelCompError("code similarity needs rapidfuzz (pip install 'parallelcomp-triton[eval]')") from None
    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz.ratio(line, reference) / 100.0


METRICS = {"qa_f1": qa_f1_score, "rouge_l": rouge_l_score, "classification": classification_score,
           "retrieval": retrieval_score, "count": count_score, "code_sim": code_sim_score}


def _base(dataset: str) -> str:
    return dataset[:-2] if dataset.endswith("_e") and dataset[:-2] in TASKS else dataset


def task_for(dataset: str) -> Task:
    base = _base(dataset)
    if base not in TASKS:
        raise ParallelCompError(f"dataset {dataset!r}: not an English LongBench task (one of {', '.join(TASKS)})")
    return TASKS[base]


def score_sample(dataset: str, prediction: str, answers, all_classes=None) -> float:
    """LongBench's per-sample score: the max over the reference answers."""
    task = task_for(dataset)
    if task.first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[task.metric]
    return max((metric(prediction, ref, all_classes=all_classes or ()) for ref in answers), default=0.0)


# --------------------------------------------------------------------------------------------------
# Data and prompts
# --------------------------------------------------------------------------------------------------


def load_records(path: str, dataset: str | None = None, limit: int | None = None) -> list[dict]:
    """Read and check a LongBench JSONL file; every record gets its `dataset` resolved. With `dataset`,
    only records of that task (or with no `dataset` field) are read."""
    if limit is not None and limit < 1:
        raise ParallelCompError(f"--limit {limit}: must be >= 1")
    if dataset is not None:
        task_for(dataset)
    try:
        text = read_input_bytes(path, "a JSONL file").decode("utf-8")
    except UnicodeDecodeError:
        raise ParallelCompError(f"{path}: not UTF-8 text") from None
    stem = os.path.splitext(os.path.basename(path))[0]
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        rec = _check_record(path, number, line, dataset, stem)
        if dataset is not None and _base(rec["dataset"]) != _base(dataset):
            continue
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ParallelCompError(f"{path}: no records" + (f" of dataset {dataset}" if dataset else ""))
    return records


def _check_record(path, number, line, dataset, stem) -> dict:
    where = f"{path}:{number}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ParallelCompError(f"{where}: not a JSON object ({e.msg})") from None
    if not isinstance(rec, dict):
        raise ParallelCompError(f"{where}: not a JSON object")
    for key in ("context", "answers"):
        if key not in rec:
            raise ParallelCompError(f"{where}: missing field {key!r}")
    if not isinstance(rec["context"], str) or not rec["context"].strip():
        raise ParallelCompError(f"{where}: 'context' must be a non-empty string")
    if not isinstance(rec.get("input", ""), str):
        raise ParallelCompError(f"{where}: 'input' must be a string")
    answers = rec["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ParallelCompError(f"{where}: 'answers' must be a non-empty list of strings")
    name = rec.get("dataset") or dataset or stem
    if not isinstance(name, str):
        raise ParallelCompError(f"{where}: 'dataset' must be a string")
    try:
        task = task_for(name)
    except ParallelCompError as e:
        raise ParallelCompError(f"{where}: {e} (set --dataset)") from None
    classes = rec.get("all_classes")
    if task.metric == "classification" and (not isinstance(classes, list) or not classes):
        raise ParallelCompError(f"{where}: dataset {name} needs 'all_classes', a non-empty list")
    length = rec.get("length")
    if length is not None and (not isinstance(length, int) or length < 0):
        raise ParallelCompError(f"{where}: 'length' must be a non-negative integer")
    return {"context": rec["context"], "input": rec.get("input", ""), "answers": answers, "all_classes": classes,
            "length": length, "dataset": name, "_id": rec.get("_id")}


def build_prompt(dataset: str, record: dict, tokenizer, template: str = "auto") -> tuple[str, str]:
    """The pipeline's (prompt, question) for a record. The LongBench template is cut at {context}: what
    precedes it is the shared prefix, what follows it (with {input} filled in) is the question suffix that
    ParallelComp appends to every chunk. template: plain, chat (the tokenizer's chat template) or auto (chat
    where LongBench uses it and the tokenizer has one)."""
    task = task_for(dataset)
    i = task.prompt.index("{context}")
    prefix, suffix = task.prompt[:i], task.prompt[i + len("{context}"):].replace("{input}", record["input"])
    body = prefix + "{context}{question}"
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ParallelCompError("template 'chat': the model's tokenizer has no chat template")
    if template == "chat" or (template == "auto" and task.chat and has_chat):
        body = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)
    return body, suffix


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def evaluate_longbench(pc, records: list[dict], config, template: str = "auto", max_new_tokens: int | None = None,
                       log=None) -> dict:
    """Generate and score every record. A record the pipeline refuses (e.g. a question longer than the
    window) scores 0 and keeps its error; if every record is refused the first error is raised."""
    samples, first_error = [], None
    for n, rec in enumerate(records):
        task = task_for(rec["dataset"])
        prompt, question = build_prompt(rec["dataset"], rec, pc.tokenizer, template)
        cfg = dataclasses.replace(config, prompt=prompt, max_new_tokens=max_new_tokens or task.max_new_tokens)
        t = time.perf_counter()
        row = {"dataset": rec["dataset"], "_id": rec["_id"], "length": rec["length"], "answers": rec["answers"]}
        try:
            res = pc.generate(rec["context"], question, config=cfg)
        except ParallelCompError as e:
            first_error = first_error or e
            row.update(prediction="", score=0.0, error=str(e))
        else:
            st = res.stats
            row.update(prediction=res.text, score=score_sample(rec["dataset"], res.text, rec["answers"],
                                                               rec["all_classes"]),
                       document_tokens=st.document_tokens, kept_chunks=st.kept_chunks, chunks=len(st.chunk_spans),
                       kv_tokens_after=st.kv_tokens_per_layer_after)
        row["seconds"] = round(time.perf_counter() - t, 2)
        samples.append(row)
        if log:
            log(f"{rec['dataset']} {n + 1}/{len(records)}: score {row['score']:.2f} "
                f"{(row.get('error') or row['prediction'].strip())[:50]!r} ({row['seconds']} s)")
    if first_error is not None and all("error" in s for s in samples):
        raise first_error
    return {"datasets": summarize(samples), "samples": samples}


def summarize(samples: list[dict]) -> dict:
    """Per dataset: metric, sample count, errors, score (mean x 100) and LongBench-E length buckets."""
    out = {}
    for name in dict.fromkeys(s["dataset"] for s in samples):
        rows = [s for s in samples if s["dataset"] == name]
        entry = {"metric": task_for(name).metric, "samples": len(rows),
                 "errors": sum("error" in s for s in rows), "score": _mean100(s["score"] for s in rows)}
        if all(s["length"] is not None for s in rows):
            entry["by_length"] = {}
            for label, lo, hi in LENGTH_BUCKETS:
                sel = [s["score"] for s in rows if s["length"] >= lo and (hi is None or s["length"] < hi)]
                entry["by_length"][label] = _mean100(sel) if sel else None
        out[name] = entry
    return out


def _mean100(values) -> float:
    values = list(values)
    return round(100 * sum(values) / len(values), 2)


def format_table(result: dict) -> str:
    buckets = any("by_length" in d for d in result["datasets"].values())
    head = "| dataset | metric | samples | score |" + (" 0-4k | 4-8k | 8k+ |" if buckets else "")
    lines = [head, "|---|---|---:|---:|" + ("---:|---:|---:|" if buckets else "")]
    for name, d in result["datasets"].items():
        errors = f" ({d['errors']} refused)" if d["errors"] else ""
        line = f"| {name} | {d['metric']} | {d['samples']}{errors} | {d['score']:.2f} |"
        if buckets:
            by = d.get("by_length", {})
            line += "".join(f" {'-' if by.get(b) is None else f'{by[b]:.2f}'} |" for b, _, _ in LENGTH_BUCKETS)
        lines.append(line)
    if len(result["datasets"]) > 1:
        avg = sum(d["score"] for d in result["datasets"].values()) / len(result["datasets"])
        lines.append(f"| average | | {len(result['samples'])} | {avg:.2f} |" + (" | | |" if buckets else ""))
    return "\n".join(lines)
