"""Chunk-parallel prefill across ranks: 2 gloo ranks launched with torchrun on this machine must answer
exactly what one process answers."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from _cases import DISTRIBUTED, DOCUMENTS, QUESTIONS, case, cli_args, pairs, params
from parallelcomp_triton import ParallelComp
from parallelcomp_triton.distributed import chunk_shares
from parallelcomp_triton.run import main

RUNS = params(map(case, DISTRIBUTED))


@pytest.fixture(scope="module")
def pc(model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ParallelComp.from_pretrained(model_dir)
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "parallelcomp_triton.run", "--distributed", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_chunk_shares_contiguous_and_rank0_owns_chunk0():
    for n in (1, 2, 3, 7, 14):
        for world in (1, 2, 3, 5):
            shares = chunk_shares(n, world)
            assert [c for share in shares for c in share] == list(range(n))
            sizes = [len(s) for s in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            assert 0 in shares[0]


def test_distributed_without_torchrun_is_one_line_error(model_dir, tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENTS["d90"])
    assert main(["--model", str(model_dir), "--input", str(doc), "--question", "q", "--distributed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun" in err[0]


def expected_kv_bytes(pc, res, budget, rank: int, world: int) -> int:
    """Bytes rank `rank` sends: K/V of the kept chunks it owns, and their int32 kept positions (KV eviction
    only: without a budget every position is kept)."""
    a, st = pc.args, res.stats
    owned = chunk_shares(len(st.chunk_spans), world)[rank]
    per_token = 2 * a.head_dim * pc.model.embed_tokens.weight.element_size() + (4 if budget is not None else 0)
    total = 0
    for c in st.kept_chunks:
        if c in owned and rank != 0:
            s, e = st.chunk_spans[c]
            n = e - s if budget is None else min(budget, e - s)
            total += a.num_layers * a.num_kv_heads * n * per_token
    return total


@pytest.mark.slow
@pytest.mark.parametrize("c", RUNS)
def test_two_gloo_ranks_equal_one_process(pc, model_dir, tmp_path, c):
    context, question = c.context, c.question
    doc = tmp_path / "doc.txt"
    doc.write_text(context)
    proc = torchrun(2, "--model", str(model_dir), "--input", str(doc), "--question", question, "--json",
                    *cli_args(c.config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 1 prints nothing
    got = json.loads(lines[0])
    want = pc.generate(context, question, config=c.config)
    assert got["token_ids"] == want.token_ids and len(want.token_ids) > 0
    st = got["stats"]
    assert st["kept_chunks"] == want.stats.kept_chunks
    assert st["chunk_nll_all"] == pytest.approx(want.stats.chunk_nll_all, abs=1e-4)
    assert st["kv_tokens_per_layer_after"] == want.stats.kv_tokens_per_layer_after
    dist = st["distributed"]
    n = len(st["chunk_spans"])
    assert dist["world_size"] == 2 and dist["backend"] == "gloo" and n >= 10
    assert dist["chunks_per_rank"] == [len(s) for s in chunk_shares(n, 2)]
    budget = c.config.kv_budget
    assert dist["kv_bytes_sent_per_rank"] == [expected_kv_bytes(pc, want, budget, r, 2) for r in range(2)]
    assert dist["kv_bytes_sent_per_rank"][1] > 0  # the test is only meaningful if rank 1 owns a winner
    assert all(b > 0 for b in dist["score_bytes_sent_per_rank"])


@pytest.mark.slow
@pytest.mark.parametrize("c", RUNS)
def test_two_gloo_ranks_answer_jsonl_like_generate_batch(pc, model_dir, tmp_path, c):
    """Several documents, one with fewer chunks than ranks (rank 1 has nothing of it)."""
    batch = pairs(c)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i, "context": context, "question": q}) + "\n"
                            for i, (context, q) in enumerate(batch)))
    proc = torchrun(2, "--model", str(model_dir), "--input-jsonl", str(path), "--json", "--batch-docs",
                    str(len(batch)), *cli_args(c.config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["id"] for r in records] == list(range(len(batch)))
    want = pc.generate_batch(batch, config=c.config)
    assert min(len(w.stats.chunk_spans) for w in want) == 1
    for r, w in zip(records, want):
        assert r["token_ids"] == w.token_ids
        assert r["stats"]["kept_chunks"] == w.stats.kept_chunks
        assert r["stats"]["distributed"]["world_size"] == 2


@pytest.mark.slow
def test_bad_input_under_torchrun_one_line_from_rank0_no_hang(model_dir, tmp_path):
    """Only rank 0 reads the input: it tells the other ranks, and they exit 2 without hanging (torchrun then
    exits 1)."""
    proc = torchrun(2, "--model", str(model_dir), "--input", str(tmp_path / "missing.txt"), "--question", "q",
                    *cli_args(case(DISTRIBUTED[0]).config))
    assert proc.returncode != 0 and proc.stdout == ""
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours == [f"error: {tmp_path / 'missing.txt'}: no such file"]
    assert "exitcode  : 2" in proc.stderr  # torchrun's summary names the first rank that exited, with code 2


@pytest.mark.slow
@pytest.mark.parametrize("c", RUNS)
def test_two_gloo_ranks_encode_and_answer_from_the_encoding(pc, model_dir, tmp_path, c):
    """--save-encoding under --distributed: each rank writes its share of the chunks into one directory that
    loads as a complete encoding in one process; answers (there, and from it under --encoding in a new
    torchrun) equal one process's fresh answers; the chunk files hold what one process encodes."""
    context, questions = c.context, QUESTIONS[:2]
    doc, enc = tmp_path / "doc.txt", tmp_path / "enc"
    doc.write_text(context)
    ask = [arg for q in questions for arg in ("--question", q)]
    proc = torchrun(2, "--model", str(model_dir), "--input", str(doc), *ask, "--save-encoding", str(enc), "--json",
                    *cli_args(c.config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    cfg = c.config
    want = [pc.generate(context, q, config=cfg) for q in questions]
    assert [o["question"] for o in saved] == questions
    assert [o["token_ids"] for o in saved] == [w.token_ids for w in want]
    assert all(len(w.token_ids) > 0 for w in want)
    assert saved[0]["stats"]["kept_chunks"] == want[0].stats.kept_chunks
    assert saved[0]["stats"]["distributed"]["chunks_per_rank"][1] > 0

    encoded = pc.load_encoded(enc)  # complete: every rank's files listed and present
    n = len(encoded.spans)
    assert n >= 10 and not [p for p in os.listdir(tmp_path) if p.startswith(".enc.")]  # no temporary left
    mine = pc.encode(context, config=cfg)
    for i in (0, n - 1):  # rank 0's first chunk and rank 1's last
        a, b = encoded.load_chunk(i), mine.load_chunk(i)
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.keys + a.values, b.keys + b.values))
    assert [pc.generate(encoded, q, config=encoded.config(cfg)).token_ids for q in questions] == \
        [w.token_ids for w in want]

    proc = torchrun(2, "--model", str(model_dir), "--encoding", str(enc), "--question", questions[1], "--json",
                    *cli_args(c.config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["token_ids"] == want[1].token_ids


@pytest.mark.slow
def test_distributed_encoding_errors_one_line_no_hang(model_dir, tmp_path):
    """A bad --encoding under torchrun: every rank fails alike, rank 0 says it in one line, exit 2."""
    proc = torchrun(2, "--model", str(model_dir), "--encoding", str(tmp_path / "none"), "--question", "q",
                    "--no-progress")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no such directory" in errors[0], proc.stderr[-3000:]
