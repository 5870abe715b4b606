"""The passkey / NIAH harness: needle-chunk bookkeeping, accuracy table, CLI."""
import json

import pytest

from parallelcomp_triton import ParallelCompConfig
from parallelcomp_triton.evaluate import evaluate, evaluate_styles, format_table, main, needle_chunk, nll_rank
from parallelcomp_triton.prompt import split_even
from parallelcomp_triton.tasks import passkey_case


@pytest.fixture(scope="module")
def pc():
    from _tiny_pipeline import tiny_pc

    return tiny_pc(layers=2)


@pytest.mark.parametrize("depth", [0.0, 0.35, 0.8, 1.0])
def test_needle_chunk_is_the_chunk_that_holds_the_key(pc, depth):
    cfg = ParallelCompConfig(chunk_tokens=200, kv_budget=40, keep_chunks=2, max_new_tokens=2)
    res = evaluate(pc, "passkey", [900], [depth], cfg)
    (row,) = res["cases"]
    case = passkey_case(pc.tokenizer, 900, depth=depth)
    at = case.context.find(case.answer)  # the byte tokenizer: one token per byte
    spans = split_even(row["tokens"], 200)  # what the pipeline cuts
    assert row["chunks"] == len(spans) and row["answer"] == case.answer
    s, e = spans[row["needle_chunk"]]
    assert s <= at < e
    assert row["needle_kept"] == (row["needle_chunk"] in row["kept_chunks"])
    assert row["needle_kept"] == (row["needle_rank"] <= cfg.keep_chunks)  # kept = the K lowest NLL
    assert row["kv_cache_bytes"] > 0 and row["correct"] == (case.answer in row["output"])


@pytest.mark.parametrize("at,expected", [(0, 0), (199, 0), (200, 1), (399, 1)])
def test_needle_chunk_at_span_edges(pc, at, expected):
    from parallelcomp_triton.tasks import RetrievalCase

    context = "x" * at + "98765" + "y" * (400 - at)  # the byte tokenizer: one token per byte
    case = RetrievalCase(context, "key?", "98765", len(context), 0.5)
    assert needle_chunk(pc.tokenizer, case, [(0, 200), (200, 405)]) == expected
    assert needle_chunk(pc.tokenizer, case, [(0, 405)]) is None  # one chunk: nothing to evict


@pytest.mark.parametrize("nll,chunk,rank", [
    ([2.0, 1.0, 3.0], 0, 2), ([2.0, 1.0, 3.0], 1, 1), ([2.0, 1.0, 3.0], 2, 3), ([1.0, 1.0], 1, 1),
    ([2.0, 1.0], None, None), ([], 0, None)])
def test_nll_rank(nll, chunk, rank):
    assert nll_rank(nll, chunk) == rank


def test_table_counts_accuracy_and_kept_needles():
    result = {"task": "niah", "accuracy": {"16000": 0.5}, "cases": [
        {"target_tokens": 16000, "needle_chunk": 3, "needle_kept": True},
        {"target_tokens": 16000, "needle_chunk": 9, "needle_kept": False}]}
    assert "| 16000 | 50% | 1/2 |" in format_table(result)


def test_cli_writes_json_and_table(tmp_path, capsys, monkeypatch):
    from _tiny_pipeline import tiny_pc

    from parallelcomp_triton.pipeline import ParallelComp

    monkeypatch.setattr(ParallelComp, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_pc(layers=2)))
    out = tmp_path / "pk.json"
    code = main(["passkey", "--lengths", "600", "--depths", "0.2,0.7", "--chunk-tokens", "150",
                 "--kv-budget", "32", "--max-new-tokens", "2", "--backend", "torch", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    assert [c["depth"] for c in result["cases"]] == [0.2, 0.7]
    assert all(c["chunks"] == 4 and len(c["kept_chunks"]) == 3 for c in result["cases"])
    assert result["config"]["chunk_tokens"] == 150
    assert "| 600 |" in captured.out


def test_cli_both_question_styles_side_by_side_without_instruction(tmp_path, capsys, monkeypatch):
    from _tiny_pipeline import tiny_pc

    from parallelcomp_triton.pipeline import ParallelComp
    from parallelcomp_triton.tasks import PASSKEY_QUESTIONS

    seen = []
    original = ParallelComp.generate

    def spy(self, context, question, *args, **kwargs):
        seen.append((question, kwargs["config"].instruction))
        return original(self, context, question, *args, **kwargs)

    monkeypatch.setattr(ParallelComp, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_pc(layers=2)))
    monkeypatch.setattr(ParallelComp, "generate", spy)
    out = tmp_path / "pk.json"
    code = main(["passkey", "--lengths", "600", "--depths", "0.5", "--chunk-tokens", "150", "--max-new-tokens", "2",
                 "--question-style", "both", "--instruction", "none", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert seen == [(PASSKEY_QUESTIONS["natural"], ""), (PASSKEY_QUESTIONS["cue"], "")]
    result = json.loads(out.read_text())
    assert sorted(result) == ["cue", "natural"] and result["natural"]["instruction"] == "none"
    assert "natural accuracy" in captured.out and "cue accuracy" in captured.out
    # By default the task's instruction goes before the document.
    seen.clear()
    assert main(["passkey", "--lengths", "600", "--depths", "0.5", "--chunk-tokens", "150",
                 "--max-new-tokens", "2"]) == 0
    assert seen[0][0] == PASSKEY_QUESTIONS["cue"] and seen[0][1]


@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_styles_from_one_encoding_equal_fresh_runs(pc, monkeypatch, task):
    """Both question styles answered from one encoding of each document: the rows fresh runs give."""
    from parallelcomp_triton.pipeline import ParallelComp

    cfg = ParallelCompConfig(chunk_tokens=150, kv_budget=24, keep_chunks=2, max_new_tokens=3)
    encodes = []
    original = ParallelComp.encode
    monkeypatch.setattr(ParallelComp, "encode", lambda self, *a, **k: encodes.append(1) or original(self, *a, **k))
    both = evaluate_styles(pc, task, [700], [0.2, 0.7], cfg, ["natural", "cue"], instruction="none")
    assert len(encodes) == 2  # once per document, not per question
    for result in both:
        fresh = evaluate(pc, task, [700], [0.2, 0.7], cfg, question=result["question"], instruction="none")
        assert result["accuracy"] == fresh["accuracy"]
        for a, b in zip(result["cases"], fresh["cases"], strict=True):
            for key in ("output", "correct", "needle_chunk", "needle_rank", "kept_chunks", "chunk_nll",
                        "kv_tokens_after", "template"):
                assert a[key] == b[key], key
    assert both[0]["cases"][0]["chunk_nll"] != both[1]["cases"][0]["chunk_nll"]  # two questions, two scores


@pytest.mark.parametrize("args,expect", [
    (["passkey", "--question", "q?", "--question-style", "cue"], "not both"),
    (["passkey", "--lengths", "50"], "--lengths"),
    (["niah", "--depths", "1.5"], "--depths"),
    (["passkey", "--lengths", "x"], "comma-separated"),
    (["passkey", "--kv-budget", "0"], "kv_budget"),
    (["passkey", "--mode", "bogus"], "--mode"),
    (["--lengths", "600", "longbench"], "longbench must come first"),
    (["--lengths", "600", "compare"], "compare must come first"),
    (["compare", "--methods", "parallelcomp,ropey"], "ropey"),
    (["compare", "--tasks", "passkey,qa"], "qa"),
    (["compare", "--lengths", "50"], "--lengths"),
    (["compare", "--depths", "0.5,2"], "--depths"),
    (["compare", "--self-extend-group", "0"], "self_extend_group"),
    (["compare", "--resume"], "--resume needs"),
    (["compare", "--json", "/no/such/folder/x.json"], "does not exist"),
])
def test_cli_bad_input_one_line_exit_2(capsys, args, expect):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0]


def test_budget_sweep_reports_each_point(tmp_path, capsys, monkeypatch):
    import importlib.util
    import pathlib
    import sys

    from _tiny_pipeline import tiny_pc

    from parallelcomp_triton.pipeline import ParallelComp

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "budget_sweep.py"
    spec = importlib.util.spec_from_file_location("budget_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    monkeypatch.setattr(ParallelComp, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_pc(layers=2)))
    out = tmp_path / "budget.json"
    monkeypatch.setattr(sys, "argv", ["budget_sweep.py", "--task", "passkey", "--tokens", "2500", "--depths", "0.5",
                                      "--budgets", "16,none", "--keeps", "1,2", "--out", str(out)])
    assert sweep.main() == 0
    rows = json.loads(out.read_text())["rows"]
    default = ParallelCompConfig()
    assert [(r["kv_budget"], r["keep_chunks"]) for r in rows] == [
        (16, default.keep_chunks), (None, default.keep_chunks), (default.kv_budget, 1), (default.kv_budget, 2)]
    kv = {(r["kv_budget"], r["keep_chunks"]): r["merged_kv_bytes"] for r in rows}
    assert kv[(16, 3)] < kv[(None, 3)] and kv[(default.kv_budget, 1)] < kv[(default.kv_budget, 2)]
    assert "| all | 3 |" in capsys.readouterr().out


def test_replay_budget_reproduces_the_run_at_its_own_budget(tmp_path, capsys, monkeypatch):
    import dataclasses
    import importlib.util
    import pathlib

    from _tiny_pipeline import tiny_pc

    from parallelcomp_triton.pipeline import ParallelComp

    pc = tiny_pc(layers=2)
    cfg = ParallelCompConfig(chunk_tokens=300, keep_chunks=2, kv_budget=16, max_new_tokens=4)
    run = evaluate(pc, "passkey", [1500], [0.3, 0.8], cfg)
    run["config"] = dataclasses.asdict(cfg)
    src = tmp_path / "run.json"
    src.write_text(json.dumps(run))
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "replay.py"
    spec = importlib.util.spec_from_file_location("replay", path)
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    monkeypatch.setattr(ParallelComp, "from_pretrained", classmethod(lambda cls, *a, **k: pc))
    out = tmp_path / "replay.json"
    argv = ["budget", str(src), "--budgets", "16,none", "--keeps", "2,1", "--out", str(out)]
    assert replay.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["depth"], r["keep_chunks"], r["kv_budget"]) for r in rows] == [
        (d, k, b) for d in (0.3, 0.8) for k in (2, 1) for b in (16, None)]
    single = evaluate(pc, "passkey", [1500], [0.3, 0.8], dataclasses.replace(cfg, keep_chunks=1))
    for case, case_k1 in zip(run["cases"], single["cases"]):
        same, full, k1, _ = [r for r in rows if r["depth"] == case["depth"]]
        # Encoding only the kept chunks at the run's own B and K gives the run's answer and merged length;
        # at K = 1 it gives what a K = 1 run gives.
        assert same["output"] == case["output"] and same["kv_tokens_after"] == case["kv_tokens_after"]
        assert full["kv_tokens_after"] > same["kv_tokens_after"]
        assert k1["kept_chunks"] == case_k1["kept_chunks"] and k1["output"] == case_k1["output"]
    assert "| passkey | cue | 1500 | 1 | all |" in capsys.readouterr().out

    # A run whose chunks this code cuts elsewhere is refused, not silently replayed.
    moved = json.loads(src.read_text())
    moved["cases"][0]["chunk_ends"][0] -= 1
    src.write_text(json.dumps(moved))
    assert replay.main(argv) == 2
    assert "the chunking changed since the run" in capsys.readouterr().err

    # A grid of both question styles without the task instruction (`evaluate --question-style both
    # --instruction none`, one JSON holding a result per style) replays each style's own prompt.
    styles = evaluate_styles(pc, "niah", [900], [0.4], cfg, ["natural", "cue"], instruction="none")
    both = tmp_path / "styles.json"
    both.write_text(json.dumps({r["question"]: dict(r, config=dataclasses.asdict(cfg)) for r in styles}))
    assert replay.main(["budget", str(both), "--budgets", "16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["question"], r["output"]) for r in rows] == [(r["question"], r["cases"][0]["output"]) for r in styles]
    assert "| niah | natural | 900 | 2 | 16 |" in capsys.readouterr().out


# ------------------------------------------------------------------ RULER-style tasks and `compare`

@pytest.mark.parametrize("task", ["passkey", "niah", "multikey", "multivalue", "multiquery", "vartrack", "fwe"])
@pytest.mark.parametrize("tokens", [500, 3000])
def test_task_cases_hold_what_they_ask_for(pc, task, tokens):
    from parallelcomp_triton.tasks import CASES

    case = CASES[task](pc.tokenizer, tokens, depth=0.3, seed=1)
    required = case.required or (case.answer,)
    assert abs(case.tokens - tokens) <= 0.05 * tokens + 30, (case.tokens, tokens)
    for item in required:
        assert item in case.context
    assert case.score(" ".join(required)) == 1.0 and case.score("nothing") == 0.0
    if len(required) > 1:
        assert case.score(required[0]) == pytest.approx(1 / len(required))
    again = CASES[task](pc.tokenizer, tokens, depth=0.3, seed=1)
    assert again.context == case.context and again.question == case.question  # deterministic
    assert CASES[task](pc.tokenizer, tokens, depth=0.3, seed=2).context != case.context


def test_distractors_and_chains_are_what_the_tasks_say(pc):
    from parallelcomp_triton.tasks import fwe_case, multikey_case, vartrack_case

    mk = multikey_case(pc.tokenizer, 2000, depth=0.2)
    assert mk.context.count("The special magic number for ") == 4 and mk.answer in mk.context
    asked = mk.question.split("for ")[1].split(" mentioned")[0]
    assert f"The special magic number for {asked} is {mk.answer}." in mk.context
    assert mk.context.index(mk.answer) < 0.35 * len(mk.context)  # the one asked for sits at its depth
    vt = vartrack_case(pc.tokenizer, 2000, depth=0.4)
    first, *rest = vt.required
    value = vt.question.split("value ")[1].split(" ")[0]
    positions = [vt.context.index(f"VAR {first} = {value}.")]
    positions += [vt.context.index(f"VAR {b} = VAR {a}.") for a, b in zip(vt.required, rest)]
    assert positions == sorted(positions)  # each hop after the one it copies
    words = fwe_case(pc.tokenizer, 2000).context.split()
    counts = sorted(((words.count(w), w) for w in set(words)), reverse=True)
    assert tuple(w for _, w in counts[:3]) == fwe_case(pc.tokenizer, 2000).required


def test_compare_runs_every_method_on_the_same_cases(tmp_path, capsys, monkeypatch):
    from _tiny_pipeline import tiny_pc

    from parallelcomp_triton.pipeline import ParallelComp

    seen = {}
    real_generate = ParallelComp.generate

    def spy(self, context, question, *a, config=None, **k):
        seen.setdefault(config.mode, []).append((context, question, config.max_new_tokens, config.instruction))
        return real_generate(self, context, question, *a, config=config, **k)

    monkeypatch.setattr(ParallelComp, "generate", spy)
    monkeypatch.setattr(ParallelComp, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_pc(layers=2,
                                                                                                   window=512)))
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    args = ["compare", "--methods", "parallelcomp,streaming,truncate", "--tasks", "passkey,multivalue",
            "--lengths", "300,900", "--depths", "0.3,0.6", "--reference-length", "200", "--chunk-tokens", "128",
            "--stream-step", "64", "--backend", "torch", "--json", str(out)]
    code = main(args + (["--plot", str(png)] if _has_matplotlib() else []))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    cells = {(c["method"], c["task"], c["length"]): c for c in result["cells"]}
    for task in ("passkey", "multivalue"):
        assert set(result["reference"][task]["cells"]) == {"full", "parallelcomp"}
        for length in (300, 900):
            for method in ("parallelcomp", "streaming", "truncate"):
                c = cells[(method, task, length)]
                assert c["skipped"] is None and [x["depth"] for x in c["cases"]] == [0.3, 0.6]
                assert c["accuracy"] == sum(x["score"] for x in c["cases"]) / 2
                if method == "parallelcomp":  # where each required item's chunk went
                    for x in c["cases"]:
                        assert len(x["required_chunks"]) == len(x["required"]) and len(x["kept_chunks"]) <= 3
                        assert x["required_kept"] == sum(r in x["kept_chunks"] for r in x["required_chunks"])
                        assert x["required_kept"] == sum(r is not None and r <= 3 for r in x["required_ranks"])
                        assert x["chunks"] > 1 or length == 300
    # every method was asked the same questions about the same documents, with the same answer room
    assert seen["parallelcomp"][-4:] == seen["streaming"][-4:] == seen["truncate"][-4:]
    assert {x[2] for x in seen["truncate"]} == {32, 64}  # passkey's room, multivalue's
    assert "| passkey (" in captured.out and "| multivalue | 900 |" in captured.out
    if _has_matplotlib():
        assert png.stat().st_size > 1000

    # grown by a second run: the old cells kept, a new method added, skipped by --max-seconds where too slow;
    # a setting added to the package since the first run (absent from its config) counts as its default then
    first = json.loads(out.read_text())
    del first["config"]["kv_store"]
    out.write_text(json.dumps(first))
    code = main(["compare", "--methods", "self-extend", "--tasks", "passkey", "--lengths", "300,900", "--depths",
                 "0.3,0.6", "--reference-length", "200", "--chunk-tokens", "128", "--stream-step", "64",
                 "--backend", "torch", "--json", str(out), "--resume", "--max-seconds", "1e-6",
                 "--self-extend-window", "64"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    grown = json.loads(out.read_text())
    assert grown["grid"]["methods"] == ["parallelcomp", "streaming", "truncate", "self-extend"]
    old = {(c["method"], c["task"], c["length"]): c for c in grown["cells"]}
    assert all(old[k] == v for k, v in cells.items())
    assert old[("self-extend", "passkey", 300)]["accuracy"] is not None
    assert "quadratic" in old[("self-extend", "passkey", 900)]["skipped"]
    assert "skipped self-extend passkey 900: estimated" in captured.out


def test_compare_resume_refuses_other_settings(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp.json"
    out.write_text(json.dumps({"model": "tiny", "dtype": "float32", "grid": {}, "cells": [], "config": {}}))
    from _tiny_pipeline import tiny_pc

    from parallelcomp_triton.pipeline import ParallelComp

    monkeypatch.setattr(ParallelComp, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_pc(layers=2)))
    assert main(["compare", "--json", str(out), "--resume", "--lengths", "300"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0]


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None
