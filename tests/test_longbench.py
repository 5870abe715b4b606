"""LongBench-format evaluation: the standard metrics on hand-made cases, prompts, data checks, the CLI."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from parallelcomp_triton import longbench as lb
from parallelcomp_triton.errors import ParallelCompError
from parallelcomp_triton.evaluate import main
from parallelcomp_triton.stats import GenerationResult, Stats

SAMPLE = pathlib.Path(__file__).parent / "data" / "longbench_sample.jsonl"
TREC = ["Abbreviation", "City", "Date", "Individual", "Number", "Number of something"]


# ---------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("prediction,reference,expected", [
    ("Dunmore.", "dunmore", 1.0),
    ("The Dunmore harbour", "Dunmore", 2 / 3),        # p = 1/2, r = 1
    ("a beekeeper", "the beekeeper", 1.0),             # articles dropped
    ("paris paris", "paris", 2 / 3),                   # a repeated token matches once
    ("north side of town", "town hall north", 4 / 7),  # common {north, town}: p = 2/4, r = 2/3
    ("London", "Paris", 0.0),
    ("", "Paris", 0.0),
])
def test_qa_f1(prediction, reference, expected):
    assert lb.qa_f1_score(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize("prediction,reference,expected", [
    ("the cat sat on the mat", "the cat lay on a mat", 2 / 3),  # LCS the-cat-on-mat: 4 of 6 both ways
    ("Ben brings lemonade.", "ben brings lemonade", 1.0),      # case and punctuation ignored
    ("mat the on", "the cat on the mat", 2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5)),  # LCS "the on": 2
    ("", "the cat", 0.0),
])
def test_rouge_l(prediction, reference, expected):
    assert lb.rouge_l_score(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize("prediction,reference,expected", [
    ("Individual", "Individual", 1.0),
    ("City or Individual", "Individual", 0.5),
    ("Date", "Individual", 0.0),
    ("no idea", "Individual", 0.0),
    # "Number" is inside the reference "Number of something": it does not split the credit.
    ("Number of something", "Number of something", 1.0),
    ("Number", "Number of something", 0.0),
])
def test_classification(prediction, reference, expected):
    assert lb.classification_score(prediction, reference, all_classes=TREC) == pytest.approx(expected)


@pytest.mark.parametrize("prediction,reference,expected", [
    ("Paragraph 2", "Paragraph 2", 1.0),
    ("Paragraph 2 or Paragraph 3", "Paragraph 2", 0.5),
    ("Paragraph 12", "Paragraph 2", 0.0),
    ("I cannot tell", "Paragraph 2", 0.0),
])
def test_retrieval(prediction, reference, expected):
    assert lb.retrieval_score(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize("prediction,reference,expected", [
    ("3", "3", 1.0), ("There are 3, not 4.", "3", 0.5), ("13", "3", 0.0), ("three", "3", 0.0)])
def test_count(prediction, reference, expected):
    assert lb.count_score(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize("prediction,reference,expected", [
    ("    return width * height\n", "    return width * height", 1.0),
    ("abcd", "abce", 0.75),                     # Indel: 1 - (1 + 1) / (4 + 4)
    ("x = 1  # set\nabcd", "abce", 0.75),       # comment lines are skipped
    ("```python\n// c\nabcd\nzzz", "abce", 0.75),
    ("\n\nab", "abcd", 1 - 2 / 6),
    ("", "abcd", 0.0),
])
def test_code_similarity(prediction, reference, expected):
    assert lb.code_sim_score(prediction, reference) == pytest.approx(expected)


def test_score_sample_max_over_answers_and_first_line():
    assert lb.score_sample("hotpotqa", "a beekeeper", ["farmer", "beekeeper"]) == 1.0
    # trec, triviaqa and samsum score the first line only; the QA tasks score the whole prediction.
    assert lb.score_sample("triviaqa", "\nParis\nLondon", ["Paris"]) == 1.0
    assert lb.score_sample("hotpotqa", "Paris\nLondon", ["Paris"]) == pytest.approx(2 / 3)
    assert lb.score_sample("trec", "City\nIndividual", ["Individual"], TREC) == 0.0
    assert lb.score_sample("passage_count", "2", ["3", "2"]) == 1.0
    assert lb.score_sample("hotpotqa_e", "Paris", ["Paris"]) == 1.0  # LongBench-E names
    with pytest.raises(ParallelCompError, match="not an English LongBench task"):
        lb.score_sample("dureader", "x", ["x"])


def test_summarize_means_and_length_buckets():
    rows = [{"dataset": "hotpotqa", "score": s, "length": n} for s, n in ((1.0, 100), (0.5, 5000), (0.0, 9000))]
    rows.append({"dataset": "lcc", "score": 0.25, "length": None, "error": "refused"})
    out = lb.summarize(rows)
    assert out["hotpotqa"]["score"] == 50.0 and out["hotpotqa"]["samples"] == 3
    assert out["hotpotqa"]["by_length"] == {"0-4k": 100.0, "4-8k": 50.0, "8k+": 0.0}
    assert out["lcc"] == {"metric": "code_sim", "samples": 1, "errors": 1, "score": 25.0}
    table = lb.format_table({"datasets": out, "samples": rows})
    assert "| hotpotqa | qa_f1 | 3 | 50.00 | 100.00 | 50.00 | 0.00 |" in table
    assert "| average | | 4 | 37.50 |" in table


def test_every_english_task_has_a_prompt_metric_and_length():
    assert len(lb.TASKS) == 16
    for name, task in lb.TASKS.items():
        assert task.prompt.count("{context}") == 1, name
        assert task.metric in lb.METRICS and task.max_new_tokens > 0


# ---------------------------------------------------------------------------------------------- data, prompts


def test_sample_file_loads_and_limit(tmp_path):
    records = lb.load_records(str(SAMPLE))
    assert {r["dataset"] for r in records} >= {"hotpotqa", "trec", "passage_retrieval_en", "lcc"}
    assert len(lb.load_records(str(SAMPLE), limit=2)) == 2
    # --dataset selects a task's records; for records without the field it names the task, else the
    # file name does.
    assert [r["dataset"] for r in lb.load_records(str(SAMPLE), dataset="trec")] == ["trec"]
    one = tmp_path / "qasper.jsonl"
    one.write_text(json.dumps({"context": "c", "input": "q", "answers": ["a"]}) + "\n")
    assert lb.load_records(str(one))[0]["dataset"] == "qasper"
    assert lb.load_records(str(one), dataset="musique")[0]["dataset"] == "musique"
    with pytest.raises(ParallelCompError, match="no records of dataset qasper"):
        lb.load_records(str(SAMPLE), dataset="qasper")


@pytest.mark.parametrize("line,expect", [
    ("{not json", ":1: not a JSON object"),
    ('["a"]', "not a JSON object"),
    ('{"input": "q", "answers": ["a"]}', "missing field 'context'"),
    ('{"context": "c", "answers": "a"}', "'answers' must be a non-empty list"),
    ('{"context": "c", "answers": ["a"], "dataset": "trec"}', "needs 'all_classes'"),
    ('{"context": "c", "answers": ["a"], "dataset": "wikisum"}', "not an English LongBench task"),
    ('{"context": "c", "answers": ["a"], "length": -3}', "'length'"),
])
def test_bad_records_name_the_line(tmp_path, line, expect):
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ParallelCompError, match=expect.replace("[", r"\[").replace("(", r"\(")):
        lb.load_records(str(path))


def test_prompt_is_longbench_prompt_cut_at_the_context():
    from _tiny_pipeline import byte_tokenizer

    tok = byte_tokenizer()
    rec = {"context": "CTX", "input": "Who? {braces} stay"}
    for name, task in lb.TASKS.items():
        prompt, question = lb.build_prompt(name, rec, tok, template="plain")
        full = task.prompt.replace("{context}", "CTX").replace("{input}", rec["input"])
        assert prompt.replace("{context}", "CTX").replace("{question}", question) == full, name
    # auto: the chat template for the instruction tasks, plain for the few-shot and code ones.
    chat, _ = lb.build_prompt("hotpotqa", rec, tok, template="auto")
    assert chat.startswith("<|im_start|>user\n") and chat.endswith("{question}<|im_end|>\n<|im_start|>assistant\n")
    assert lb.build_prompt("trec", rec, tok, template="auto")[0].startswith("Please determine")
    tok.chat_template = None
    assert lb.build_prompt("hotpotqa", rec, tok, template="auto")[0].startswith("Answer the question")
    with pytest.raises(ParallelCompError, match="no chat template"):
        lb.build_prompt("hotpotqa", rec, tok, template="chat")


# ---------------------------------------------------------------------------------------------- evaluation


class OraclePC:
    """Stands in for ParallelComp: answers with the record's first reference (or a wrong answer), and
    keeps the configs it was given."""

    def __init__(self, records, wrong=False):
        from _tiny_pipeline import byte_tokenizer

        self.tokenizer = byte_tokenizer()
        self.answers = {r["context"]: r["answers"][0] for r in records}
        self.wrong, self.configs = wrong, []

    def generate(self, context, question, config=None, **_):
        self.configs.append(config)
        if "REFUSE" in question:
            raise ParallelCompError("question too long")
        return GenerationResult(text="zzzz" if self.wrong else self.answers[context], token_ids=[],
                                stats=Stats(chunk_spans=[[0, 1]], kept_chunks=[0]))


def test_evaluate_scores_every_metric_through_the_harness():
    from parallelcomp_triton import ParallelCompConfig

    records = lb.load_records(str(SAMPLE))
    pc = OraclePC(records)
    result = lb.evaluate_longbench(pc, records, ParallelCompConfig())
    assert all(d["score"] == 100.0 for d in result["datasets"].values()), result["datasets"]
    # Each dataset's own output length and a prompt holding the context slot.
    for rec, cfg in zip(records, pc.configs):
        assert cfg.max_new_tokens == lb.TASKS[rec["dataset"]].max_new_tokens
        assert "{context}" in cfg.prompt
    wrong = lb.evaluate_longbench(OraclePC(records, wrong=True), records, ParallelCompConfig(), max_new_tokens=5)
    assert all(d["score"] == 0.0 for d in wrong["datasets"].values())


def test_refused_records_score_zero_unless_all_are_refused():
    from parallelcomp_triton import ParallelCompConfig

    records = lb.load_records(str(SAMPLE), dataset="hotpotqa")
    assert len(records) == 2
    records[0] = dict(records[0], input="REFUSE")
    result = lb.evaluate_longbench(OraclePC(records), records, ParallelCompConfig(), template="plain")
    assert [s["score"] for s in result["samples"]] == [0.0, 1.0]
    assert result["samples"][0]["error"] == "question too long" and "error" not in result["samples"][1]
    assert result["datasets"]["hotpotqa"]["errors"] == 1 and result["datasets"]["hotpotqa"]["score"] == 50.0
    with pytest.raises(ParallelCompError, match="question too long"):
        lb.evaluate_longbench(OraclePC(records), records[:1], ParallelCompConfig(), template="plain")


def _one_error_line(stderr):
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.parametrize("args,expect", [
    (["--data", "missing.jsonl"], "no such file"),
    (["--data", str(SAMPLE), "--dataset", "wikisum"], "not an English LongBench task"),
    (["--data", str(SAMPLE), "--limit", "0"], "--limit 0"),
    (["--data", str(SAMPLE), "--kv-budget", "0"], "kv_budget"),
    (["--data", str(SAMPLE), "--json", "/nonexistent/dir/out.json"], "does not exist"),
    ([], "--data"),
    (["--data", str(SAMPLE), "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--data", str(SAMPLE), "--template", "fancy"], "--template"),
])
def test_cli_bad_input_one_line_exit_2(capsys, args, expect):
    assert main(["longbench", *args]) == 2
    assert expect in _one_error_line(capsys.readouterr().err)


def test_cli_end_to_end_on_sample_with_tiny_model(tmp_path, capsys, monkeypatch):
    from _tiny_pipeline import tiny_pc

    from parallelcomp_triton.pipeline import ParallelComp

    monkeypatch.setattr(ParallelComp, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_pc(layers=2)))
    out = tmp_path / "lb.json"
    code = main(["longbench", "--data", str(SAMPLE), "--max-new-tokens", "3", "--chunk-tokens", "128",
                 "--kv-budget", "48", "--backend", "torch", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    records = lb.load_records(str(SAMPLE))
    assert len(result["samples"]) == len(records)
    for name, entry in result["datasets"].items():
        scores = [s["score"] for s in result["samples"] if s["dataset"] == name]
        assert entry["score"] == pytest.approx(round(100 * sum(scores) / len(scores), 2))
        assert f"| {name} | {entry['metric']} |" in captured.out
    for s in result["samples"]:
        assert 0.0 <= s["score"] <= 1.0 and "error" not in s and isinstance(s["prediction"], str)
    assert result["config"]["kv_budget"] == 48


@pytest.mark.slow
def test_cli_on_bundled_model(bundled_model_dir, tmp_path):
    out = tmp_path / "lb.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "parallelcomp_triton.evaluate", "longbench", "--data", str(SAMPLE),
                           "--dataset", "passage_retrieval_en", "--limit", "1", "--max-new-tokens", "3",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| passage_retrieval_en | retrieval | 1 |" in proc.stdout
    sample = json.loads(out.read_text())["samples"][0]
    assert sample["prediction"].strip() and sample["document_tokens"] > 50
