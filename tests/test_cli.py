"""The command line: answers on stdout, one-line errors with exit code 2."""
import json
import os
import subprocess
import sys

import pytest
import torch

from parallelcomp_triton.run import main


def run_cli(*args, stdin=None):
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, "-m", "parallelcomp_triton.run", *args], input=stdin,
                          capture_output=True, env=env, timeout=300)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def doc(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("The pass key is 4242. " + "The grass is green. " * 40)
    return p


@pytest.mark.parametrize("make_args,expect", [
    (lambda d, t: ["--input", str(t / "missing.txt"), "--question", "q"], "no such file"),
    (lambda d, t: ["--input", str(t), "--question", "q"], "is a directory"),
    (lambda d, t: ["--input", str(d)], "--question is required"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--kv-budget", "0"], "kv_budget"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--keep-chunks", "0"], "keep_chunks"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--pool-kernel", "8"], "pool_kernel"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--kv-budget", "lots"], "kv-budget"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--calibrate", "sink:9-2"], "calibrat"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--model", str(t / "nomodel")], "nomodel"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--mode", "bogus"], "mode"),
    (lambda d, t: [], "--input"),
])
def test_bad_input_one_line_exit_2(doc, tmp_path, capsys, make_args, expect):
    code = main(make_args(doc, tmp_path))
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert expect in line


def test_argparse_errors_are_one_line(doc, capsys):
    assert main(["--input", str(doc), "--question", "q", "--max-new-tokens", "many"]) == 2
    one_error_line(capsys.readouterr().err)


def test_undecodable_and_empty_documents(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad bytes \xc3\x28")
    assert main(["--input", str(bad), "--question", "q"]) == 2
    assert "UTF-8" in one_error_line(capsys.readouterr().err)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    assert main(["--input", str(empty), "--question", "q"]) == 2
    assert "empty" in one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_answer_and_json_on_bundled_model(doc, bundled_model_dir):
    proc = run_cli("--input", "-", "--question", "What is the pass key? The pass key is", "--json",
                   "--max-new-tokens", "6", "--no-progress", stdin=doc.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert "4242" in out["answer"]
    assert out["stats"]["kv_tokens_per_layer_after"] > 0
    # A question that cannot fit the window is refused in one line.
    proc = run_cli("--input", str(doc), "--question", "why " * 9000, "--no-progress")
    assert proc.returncode == 2
    assert "window" in one_error_line(proc.stderr.decode())


@pytest.mark.slow
def test_natural_question_beyond_the_window_with_cli_defaults(bundled_model_dir, essays_dir, tmp_path, capsys):
    """The question as people type it, no answer cue, no instruction, every setting the CLI's default, on an
    essay document past the model's 8K window with a needle in it (#15)."""
    from parallelcomp_triton.loading import load_tokenizer
    from parallelcomp_triton.tasks import niah_case

    tokenizer = load_tokenizer(bundled_model_dir)
    tokenizer.model_max_length = 1 << 62
    case = niah_case(tokenizer, 10000, depth=0.5, question="natural")
    assert case.question.endswith("mentioned in the text above?") and case.tokens > 8192
    (tmp_path / "doc.txt").write_text(case.context)
    assert main(["--input", str(tmp_path / "doc.txt"), "--question", case.question, "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert case.answer in out["answer"], out["answer"]
    assert out["stats"]["template"] == "chat" and not out["stats"]["empty_answer"]


@pytest.mark.parametrize("flags,ignore,score,pool", [
    ([], False, "question", 15), (["--ignore-eos", "--score-tokens", "suffix", "--pool-kernel", "7"], True, "suffix", 7)])
def test_cli_flags_reach_the_config(doc, flags, ignore, score, pool):
    from parallelcomp_triton.run import _config, build_parser

    args = build_parser().parse_args(["--input", str(doc), "--question", "q", "--max-new-tokens", "7", *flags])
    cfg = _config(args)
    assert cfg.ignore_eos is ignore and cfg.max_new_tokens == 7 and cfg.score_tokens == score
    assert cfg.pool_kernel == pool


@pytest.mark.parametrize("template,hint", [("plain", "--template chat"), ("chat", "start of its answer")])
def test_empty_answer_is_never_silent(doc, model_dir, capsys, monkeypatch, template, hint):
    """An answer that comes out empty gets one stderr line with the likely fix, and the stats say so."""
    from parallelcomp_triton.pipeline import GenerationResult, ParallelComp

    monkeypatch.setattr(ParallelComp, "generate", lambda self, *a, **k: GenerationResult(
        text=" \n", token_ids=[], stats={"empty_answer": True, "template": template}))
    monkeypatch.setattr(ParallelComp, "from_pretrained", classmethod(lambda cls, *a, **k: cls.__new__(cls)))
    for extra in ([], ["--json"]):
        assert main(["--input", str(doc), "--question", "q", "--template", template, *extra]) == 0
        out, err = capsys.readouterr()
        (line,) = [x for x in err.splitlines() if x.strip()]
        assert line.startswith("warning: empty answer") and hint in line
        if extra:
            assert json.loads(out)["stats"]["empty_answer"] is True


def test_pipeline_reports_empty_answers(model_dir):
    from parallelcomp_triton import ParallelComp, ParallelCompConfig

    pc = ParallelComp.from_pretrained(model_dir, dtype="float32")
    res = pc.generate("The pass key is 12. " * 5, "What is it?", config=ParallelCompConfig(max_new_tokens=3))
    assert res.stats["empty_answer"] == (not res.text.strip())
    assert res.stats["template"] == "chat"  # the default, auto, on a tokenizer with a chat template
    eos = sorted(pc.eos_ids())[0]
    pc.model.lm_head.bias = torch.nn.Parameter(torch.zeros(pc.args.vocab_size))  # force EOS first
    pc.model.lm_head.bias.data[eos] = 1e4
    res = pc.generate("The pass key is 12. " * 5, "What is it?", config=ParallelCompConfig(max_new_tokens=3))
    assert res.text == "" and res.stats["empty_answer"] is True
