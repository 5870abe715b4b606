"""Answers as they are decoded (`ParallelComp.stream`) and stop strings: the streamed pieces add up to what
`generate` answers, a stop string ends the answer before it, and a stream closed early stops decoding."""
import dataclasses

import pytest

from _cases import CASES, params
from _tiny_pipeline import tiny_pc

import parallelcomp_triton.answer as answer_mod


@pytest.fixture(scope="module")
def pc():
    return tiny_pc()


@pytest.mark.parametrize("case", params(CASES[:4]))
def test_streamed_pieces_add_up_to_the_generated_answer(pc, case):
    want = pc.generate(case.context, case.question, config=case.config)
    stream = pc.stream(case.context, case.question, config=case.config)
    pieces = list(stream)
    assert "".join(pieces) == want.text and all(pieces)
    assert stream.result.token_ids == want.token_ids and stream.result.text == want.text
    assert stream.result.stats.kept_chunks == want.stats.kept_chunks


def test_a_streamed_batch_adds_up_to_generate_batch(pc):
    """stream_batch: each pair's pieces add up to its generate_batch answer; a bad pair is refused at once
    (return_errors) and the others answered; a pair that leaves is cut short, the others not."""
    from _cases import QUESTIONS, assert_same

    cfg = CASES[0].config
    pairs = [(CASES[0].context, ""), (CASES[0].context, QUESTIONS[0]), (CASES[1].context, QUESTIONS[1])]
    want = pc.generate_batch(pairs[1:], config=cfg)
    stream = pc.stream_batch(pairs, config=cfg, return_errors=True)
    assert list(stream.errors) == [0]  # known before any decoding
    pieces = {1: [], 2: []}
    for i, piece in stream:
        pieces[i].append(piece)
    for i in (1, 2):
        assert "".join(pieces[i]) == want[i - 1].text and all(pieces[i])
        assert_same(stream.result[i], want[i - 1])
    assert stream.result[0] is stream.errors[0]
    long = dataclasses.replace(cfg, max_new_tokens=12, ignore_eos=True)
    full = pc.generate_batch(pairs[1:], config=long)
    left = pc.stream_batch(pairs[1:], config=long, leave=lambda i: i == 0)
    got = {0: "", 1: ""}
    for i, piece in left:
        got[i] += piece
    assert len(left.result[0].token_ids) == 1 and left.result[1].token_ids == full[1].token_ids
    assert got[1] == full[1].text


def test_stop_string_ends_the_answer_before_it(pc):
    case = CASES[0]
    cfg = dataclasses.replace(case.config, max_new_tokens=20)
    full = pc.generate(case.context, case.question, config=cfg)
    stop = full.text[3:5]
    assert len(full.text) > 5 and stop
    cut = full.text[:full.text.find(stop)]
    stopped = pc.generate(case.context, case.question, config=dataclasses.replace(cfg, stop_strings=(stop,)))
    assert stopped.text == cut and len(stopped.token_ids) < len(full.token_ids)
    assert stopped.token_ids == full.token_ids[:len(stopped.token_ids)]
    streamed = pc.stream(case.context, case.question, config=dataclasses.replace(cfg, stop_strings=(stop,)))
    assert "".join(streamed) == cut


def test_closing_a_stream_stops_decoding(pc, monkeypatch):
    case = CASES[0]
    cfg = dataclasses.replace(case.config, max_new_tokens=20, ignore_eos=True)
    steps = []
    real = answer_mod.decode_steps

    def counting(*args, **kwargs):
        result = yield from (steps.append(pairs) or pairs for pairs in real(*args, **kwargs))
        return result

    monkeypatch.setattr(answer_mod, "decode_steps", counting)
    stream = pc.stream(case.context, case.question, config=cfg)
    it = iter(stream)
    assert next(it)
    stream.close()
    assert stream.result is None and len(steps) < 5  # 20 steps had it run on
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.parametrize("text,stops,want", [("abc\ufffd", (), "abc"), ("hello wor", ("world",), "hello "),
                                             ("hello", ("lo!",), "hel"), ("plain", None, "plain")])
def test_stable_prefix_holds_back_what_may_still_change(text, stops, want):
    assert answer_mod.stable_prefix(text, stops) == want


def test_cli_stream_prints_what_the_plain_run_prints(model_dir, tmp_path, capsys):
    from _cases import DOCUMENTS, cli_args

    from parallelcomp_triton.run import main

    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENTS["d260"])
    args = ["--model", str(model_dir), "--input", str(doc), "--question", "Which word comes first?", "--no-progress",
            *cli_args(CASES[0].config)]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == plain and plain.strip()
