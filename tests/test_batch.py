"""Batched generation (ParallelComp.generate_batch) and the --input-jsonl command line, on tiny models."""
import json

import pytest
import torch

import parallelcomp_triton.encode as encode_mod
import parallelcomp_triton.answer as answer_mod
from _cases import CASES, EXTRA_CASES, assert_same, case, cli_args, pairs, params
from _tiny_pipeline import tiny_pc
from parallelcomp_triton import ParallelComp, ParallelCompConfig, ParallelCompError
from parallelcomp_triton.cache import CompressedKVCache
from parallelcomp_triton.run import main

PAIRS = pairs(CASES[0])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pc():
    return tiny_pc()


@pytest.mark.parametrize("c", params(CASES + EXTRA_CASES))
def test_generate_batch_equals_generate(pc, c):
    batch_pairs = pairs(c)
    single = [pc.generate(context, q, config=c.config) for context, q in batch_pairs]
    batch = pc.generate_batch(batch_pairs, config=c.config)
    assert len(batch) == len(batch_pairs)
    for one, many in zip(single, batch):
        # Chunks of several documents share prefill batches: NLLs equal up to float rounding.
        assert_same(many, one, exact_nll=False)
        assert many.stats.batch_documents == len(batch_pairs)
    if c.config.mode == "parallelcomp":
        assert len({len(r.stats.chunk_spans) for r in single}) == len(batch_pairs)  # different chunk counts


def test_prefill_batches_pack_chunks_across_documents(pc, monkeypatch):
    """Prefill calls hold batch_chunks chunks regardless of document boundaries, and each document keeps
    at most K chunk caches plus one batch alive."""
    cfg = ParallelCompConfig(chunk_tokens=97, keep_chunks=2, kv_budget=16, batch_chunks=3, max_new_tokens=2)
    two = [PAIRS[0], PAIRS[2]]  # both questions longer than the score window
    seq_counts = []
    real = encode_mod.chunk_attention

    def spy(q, k, v, cu_q, cu_k, **kw):
        if int(cu_q[-1]) == int(cu_k[-1]):  # a prefill call (the question rows have Lq < Lk)
            seq_counts.append(cu_q.numel() - 1)
        return real(q, k, v, cu_q, cu_k, **kw)

    # The chunks' K/V are computed by encode.encode_chunks (the question rows by score.score_chunks).
    monkeypatch.setattr(encode_mod, "chunk_attention", spy)
    res = pc.generate_batch(two, config=cfg)
    chunks = [len(r.stats.chunk_spans) for r in res]
    total = sum(chunks)
    layers = pc.args.num_layers
    expected = [min(3, total - i) for i in range(0, total, 3)]
    assert chunks[0] % 3 != 0  # one batch straddles the two documents
    assert seq_counts == [n for n in expected for _ in range(layers)]
    for r in res:
        assert r.stats.max_alive_chunk_caches <= cfg.keep_chunks + cfg.batch_chunks


def test_finished_sequences_leave_the_batch(pc, monkeypatch):
    """A sequence that hits EOS stops costing decode work, and the others still decode as they would alone."""
    cfg = ParallelCompConfig(chunk_tokens=80, keep_chunks=2, kv_budget=24, max_new_tokens=12)
    monkeypatch.setattr(pc, "eos_ids", lambda: set())
    free = [pc.generate(c, q, config=cfg).token_ids for c, q in PAIRS]
    # Make a new token early in document 0's answer the end of text: it stops early, the others run on.
    stop = next(i for i in range(3, 12) if free[0][i] not in free[0][:i])
    eos = free[0][stop]
    monkeypatch.setattr(pc, "eos_ids", lambda: {eos})
    single = [pc.generate(c, q, config=cfg).token_ids for c, q in PAIRS]
    assert len(single[0]) == stop and max(len(s) for s in single) == 12

    decode_rows = []
    real = answer_mod.decode_attention

    def spy(q, k_cache, v_cache, cache_lens, **kw):
        assert k_cache.shape[0] == q.shape[0] == cache_lens.shape[0]
        decode_rows.append(q.shape[0])
        return real(q, k_cache, v_cache, cache_lens, **kw)

    monkeypatch.setattr(answer_mod, "decode_attention", spy)
    batch = pc.generate_batch(PAIRS, config=cfg)
    assert [r.token_ids for r in batch] == single
    # Sequence i runs one decode step per token after the first (its EOS included, if it met one).
    steps = [len(s) + (1 if len(s) < 12 else 0) - 1 for s in single]
    layers = pc.args.num_layers
    assert len(decode_rows) == layers * max(steps)
    per_step = decode_rows[::layers]
    assert per_step == [sum(1 for n in steps if n > t) for t in range(max(steps))]
    assert per_step[0] == len(PAIRS) and per_step[-1] < len(PAIRS)


def test_bad_pairs_raise_or_come_back_as_errors(pc):
    cfg = ParallelCompConfig(chunk_tokens=80, max_new_tokens=4)
    pairs = [PAIRS[0], ("   ", "What?"), PAIRS[1], (PAIRS[1][0], "why " * 2000)]
    with pytest.raises(ParallelCompError, match="pair 1: the document is empty"):
        pc.generate_batch(pairs, config=cfg)
    res = pc.generate_batch(pairs, config=cfg, return_errors=True)
    assert isinstance(res[1], ParallelCompError) and "empty" in str(res[1])
    assert isinstance(res[3], ParallelCompError) and "window" in str(res[3])
    assert res[0].token_ids == pc.generate(*PAIRS[0], config=cfg).token_ids
    assert res[2].token_ids == pc.generate(*PAIRS[1], config=cfg).token_ids
    assert pc.generate_batch([], config=cfg) == []
    with pytest.raises(ParallelCompError, match=r"pair 1: expected a \(context, question\) pair"):
        pc.generate_batch([PAIRS[0], "oops"], config=cfg)
    with pytest.raises(ParallelCompError, match="strings"):  # one pair: no index in the message
        pc.generate_batch([(b"bytes", "q")], config=cfg)


def test_keep_rows_compacts_in_place():
    torch.manual_seed(0)
    cache = CompressedKVCache(num_layers=2, batch=5, num_kv_heads=2, num_heads=4, head_dim=8, capacity=6,
                              dtype=torch.float32, device=torch.device("cpu"))
    for layer in range(2):
        cache.keys[layer].normal_()
        cache.values[layer].normal_()
        cache.set_key_mask(layer, 4, torch.rand(5, 4) > 0.5)
    cache.lengths = [1, 2, 3, 4, 5]
    before = [(k.clone(), v.clone(), m.clone()) for k, v, m in zip(cache.keys, cache.values, cache.key_mask)]
    storage = cache.keys[0].data_ptr()
    cache.keep_rows([0, 2, 4])
    assert cache.lengths == [1, 3, 5] and cache.batch == 3
    assert cache.keys[0].data_ptr() == storage  # no reallocation
    for layer, (k, v, m) in enumerate(before):
        assert torch.equal(cache.keys[layer], k[[0, 2, 4]])
        assert torch.equal(cache.values[layer], v[[0, 2, 4]])
        assert torch.equal(cache.key_mask[layer], m[[0, 2, 4]])


# ---------------------------------------------------------------------------------------------- CLI


CLI_CASE = case("budget_chat_k2_b3")
CLI_CONFIG = cli_args(CLI_CASE.config)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_answers_in_order_and_bad_lines_reported(model_dir, tmp_path, capsys):
    good = [{"id": "a", "context": PAIRS[0][0], "question": PAIRS[0][1]},
            {"context": PAIRS[1][0], "question": PAIRS[1][1]},
            {"id": 7, "context": PAIRS[2][0], "question": PAIRS[2][1]},
            {"id": None, "context": PAIRS[3][0], "question": PAIRS[3][1]}]
    lines = [json.dumps(good[0]),
             '{"context": "abc", "question": ',                               # 2: invalid JSON
             json.dumps(good[1]),
             "",                                                               # 4: blank, skipped
             json.dumps({"id": "x", "context": "   ", "question": "q"}),       # 5: empty context
             json.dumps({"context": "some text"}),                             # 6: no question
             json.dumps(good[2]),
             "[1, 2]",                                                         # 8: not an object
             json.dumps({"context": "text", "question": "why " * 2000}),       # 9: question too long
             json.dumps({"context": 5, "question": "q"}),                      # 10: not a string
             json.dumps(good[3])]
    path = write_lines(tmp_path / "in.jsonl", lines)
    code = main(["--model", str(model_dir), "--input-jsonl", str(path), "--json", "--batch-docs", "2",
                 *CLI_CONFIG])
    out, err = capsys.readouterr()
    assert code == 2
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    bad = {2: "invalid JSON", 5: "empty", 6: "'question'", 8: "JSON object", 9: "window", 10: "string"}
    err_lines = err.strip().splitlines()
    assert len(err_lines) == len(bad)
    for r in records:
        if r["line"] in bad:
            assert set(r) <= {"line", "id", "error"} and bad[r["line"]] in r["error"]
            assert any(e.startswith(f"error: {path}:{r['line']}: ") and bad[r["line"]] in e for e in err_lines)
    assert records[3]["id"] == "x"
    answered = [r for r in records if "answer" in r]
    assert [r.get("id", "-") for r in answered] == ["a", "-", 7, None]
    # Same answers as one at a time through the Python API.
    pc = ParallelComp.from_pretrained(model_dir)
    for r, g in zip(answered, good):
        res = pc.generate(g["context"], g["question"], config=CLI_CASE.config)
        assert r["token_ids"] == res.token_ids
        assert r["answer"] == res.text.strip()


def test_jsonl_all_good_exits_0_and_file_errors_exit_2(model_dir, tmp_path, capsys):
    path = write_lines(tmp_path / "ok.jsonl", [json.dumps({"context": c, "question": q}) for c, q in PAIRS[:2]])
    assert main(["--model", str(model_dir), "--input-jsonl", str(path), *CLI_CONFIG]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["line"] for line in out.splitlines()] == [1, 2]
    assert err == ""
    for args, expect in ((["--input-jsonl", str(tmp_path / "missing.jsonl")], "no such file"),
                         (["--input-jsonl", str(write_lines(tmp_path / "blank.jsonl", ["", "  "]))], "no JSON lines"),
                         (["--input-jsonl", str(path), "--question", "q"], "--question"),
                         (["--input-jsonl", str(path), "--batch-docs", "0"], "--batch-docs")):
        assert main(["--model", str(model_dir), *args]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and expect in err
