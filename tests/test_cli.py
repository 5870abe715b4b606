"""The command line: answers on stdout, one-line errors with exit code 2."""
import json
import os
import subprocess
import sys

import pytest
import torch

from parallelcomp_triton import Calibration
from parallelcomp_triton.cli import config_from_args
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


@pytest.mark.parametrize("flags", [["--max-new-tokens", "many"], ["--chunk-tokens", "huge"], ["--temperature", "hot"]])
def test_argparse_errors_are_one_line(doc, capsys, flags):
    assert main(["--input", str(doc), "--question", "q", *flags]) == 2
    assert "(see --help)" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("content,expect", [(b"\xff\xfe\x00bad bytes \xc3\x28", "UTF-8"), (b"  \n\n ", "empty")])
def test_undecodable_and_empty_documents(tmp_path, capsys, content, expect):
    path = tmp_path / "doc.txt"
    path.write_bytes(content)
    assert main(["--input", str(path), "--question", "q"]) == 2
    assert expect in one_error_line(capsys.readouterr().err)


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
    essay document past the model's 8K window with a needle in it."""
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
    from parallelcomp_triton.run import build_parser

    args = build_parser().parse_args(["--input", str(doc), "--question", "q", "--max-new-tokens", "7", *flags])
    cfg = config_from_args(args)
    assert cfg.ignore_eos is ignore and cfg.max_new_tokens == 7 and cfg.score_tokens == score
    assert cfg.pool_kernel == pool


def _front_end_parsers():
    """Every front end's parser, the arguments it requires, and the dests it leaves to its own options."""
    from parallelcomp_triton import evaluate, inspect_attention, run

    return {"run": (run.build_parser, ["--input", "d.txt", "--question", "q"], ()),
            "evaluate": (evaluate.build_parser, ["passkey"], ("instruction",)),
            "longbench": (evaluate.build_longbench_parser, ["--data", "x.jsonl"], ("instruction",)),
            "inspect_attention": (inspect_attention.build_parser,
                                  ["--input", "d.txt", "--question", "q", "--out", "a.png"], ("mode",)),
            "compare": (evaluate.build_compare_parser, [], ("mode",))}


@pytest.mark.parametrize("front_end", ["run", "evaluate", "longbench", "inspect_attention", "compare"])
def test_every_front_end_takes_the_shared_settings(front_end):
    """The settings options are declared once (cli.add_settings_options) and reach the config alike."""
    from parallelcomp_triton.cli import settings_options

    build, required, own = _front_end_parsers()[front_end]
    flags = {"--template": "plain", "--chunk-tokens": "max", "--window": "512", "--batch-chunks": "2",
             "--keep-chunks": "2", "--score-tokens": "suffix", "--kv-budget": "none", "--score-window": "4",
             "--pool-kernel": "7", "--calibrate": "sink:1-2:0.2", "--max-new-tokens": "5", "--temperature": "0.5",
             "--top-p": "0.9", "--seed": "3", "--mode": "full", "--instruction": "Read."}
    argv = list(required)
    for flag, value in flags.items():
        if flag[2:].replace("-", "_") not in own:
            argv += [flag, value]
    args = build().parse_args([*argv, "--ignore-eos"])
    assert {dest for dest in settings_options() if hasattr(args, dest)} == set(settings_options()) - set(own)
    cfg = config_from_args(args)
    assert (cfg.template, cfg.chunk_tokens, cfg.window, cfg.batch_chunks) == ("plain", None, 512, 2)
    assert cfg.keep_chunks == 2
    assert (cfg.score_tokens, cfg.kv_budget, cfg.score_window, cfg.pool_kernel) == ("suffix", None, 4, 7)
    assert cfg.calibration == Calibration(region="sink", first_layer=1, last_layer=2, tau=0.2)
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed, cfg.ignore_eos) == (5, 0.5, 0.9, 3, True)
    assert cfg.mode == ("parallelcomp" if "mode" in own else "full")
    assert cfg.instruction == ("" if "instruction" in own else "Read.")


@pytest.mark.parametrize("front_end", ["run", "evaluate", "longbench", "inspect_attention", "compare"])
@pytest.mark.parametrize("flags,expect", [
    (["--kv-budget", "0"], "kv_budget"),
    (["--calibrate", "sink:9-2"], "calibration layers"),
    (["--pool-kernel", "8"], "pool_kernel"),
    (["--kv-budget", "lots"], "--kv-budget"),
])
def test_every_front_end_refuses_bad_settings_in_one_line(tmp_path, capsys, monkeypatch, front_end, flags, expect):
    from parallelcomp_triton import evaluate, inspect_attention, run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.txt").write_text("The pass key is 4242. " * 20)
    (tmp_path / "x.jsonl").write_text('{"context": "c", "input": "q", "answers": ["a"], "dataset": "hotpotqa"}\n')
    main_of = {"run": run.main, "evaluate": evaluate.main, "longbench": lambda a: evaluate.main(["longbench", *a]),
               "inspect_attention": inspect_attention.main, "compare": lambda a: evaluate.main(["compare", *a])}
    if front_end == "inspect_attention":
        pytest.importorskip("matplotlib")
    assert main_of[front_end]([*_front_end_parsers()[front_end][1], *flags]) == 2
    assert expect in one_error_line(capsys.readouterr().err)


# What `--json` prints under "stats" for a plain answer; "encoding" joins it when the answer comes from an
# encoding, "calibration_masked_per_head" with --calibrate ("distributed" under --distributed).
JSON_STATS_KEYS = {
    "mode", "dtype", "dtype_source", "template", "document_tokens", "prefix_tokens", "question_tokens", "score_rows",
    "time_tokenize_s", "time_prefill_s", "batch_documents", "chunk_spans", "chunk_nll", "chunk_nll_all",
    "kept_chunks", "max_alive_chunk_caches", "kv_tokens_per_layer_before", "kv_tokens_per_layer_after",
    "kv_cache_bytes", "question_position", "time_question_s", "time_decode_s", "new_tokens", "decode_steps",
    "decode_ms_per_token", "time_total_s", "peak_memory_bytes", "empty_answer"}


@pytest.mark.parametrize("flags,extra", [
    ([], set()),
    (["--calibrate", "all:0-1:0.01"], {"calibration_masked_per_head"}),
    (["--question", "And the sky?"], {"encoding"}),  # two questions: answered from one encoding
    (["--mode", "streaming", "--stream-step", "64"], set()),  # the alternatives report the same keys
    (["--mode", "self-extend", "--self-extend-window", "32"], set()),
])
def test_json_prints_the_stats_keys(doc, capsys, monkeypatch, flags, extra):
    from _tiny_pipeline import tiny_pc

    from parallelcomp_triton.pipeline import ParallelComp

    monkeypatch.setattr(ParallelComp, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_pc(layers=2)))
    assert main(["--input", str(doc), "--question", "What is the pass key?", "--json", "--no-progress",
                 "--chunk-tokens", "200", "--kv-budget", "16", "--max-new-tokens", "2", *flags]) == 0
    for line in capsys.readouterr().out.splitlines():
        assert set(json.loads(line)["stats"]) == JSON_STATS_KEYS | extra


@pytest.mark.parametrize("alias,module", [("eval", "evaluate"), ("inspect", "inspect_attention")])
def test_old_module_names_still_run(alias, module):
    """`python -m parallelcomp_triton.eval` and `.inspect` run the renamed modules' command lines."""
    proc = subprocess.run([sys.executable, "-m", f"parallelcomp_triton.{alias}", "--help"], capture_output=True,
                          text=True, env=dict(os.environ, TRITON_INTERPRET="0"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"python -m parallelcomp_triton.{module}" in proc.stdout


@pytest.mark.parametrize("template,hint", [("plain", "--template chat"), ("chat", "start of its answer")])
def test_empty_answer_is_never_silent(doc, model_dir, capsys, monkeypatch, template, hint):
    """An answer that comes out empty gets one stderr line with the likely fix, and the stats say so."""
    from parallelcomp_triton.pipeline import ParallelComp
    from parallelcomp_triton.stats import GenerationResult, Stats

    monkeypatch.setattr(ParallelComp, "generate", lambda self, *a, **k: GenerationResult(
        text=" \n", token_ids=[], stats=Stats(empty_answer=True, template=template)))
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
    assert res.stats.empty_answer == (not res.text.strip())
    assert res.stats.template == "chat"  # the default, auto, on a tokenizer with a chat template
    eos = sorted(pc.eos_ids())[0]
    pc.model.lm_head.bias = torch.nn.Parameter(torch.zeros(pc.args.vocab_size))  # force EOS first
    pc.model.lm_head.bias.data[eos] = 1e4
    res = pc.generate("The pass key is 12. " * 5, "What is it?", config=ParallelCompConfig(max_new_tokens=3))
    assert res.text == "" and res.stats.empty_answer is True
