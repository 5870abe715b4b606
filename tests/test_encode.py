"""Encode a document once, answer many questions: an encoded answer equals a fresh one exactly (same chunk
K/V, same batches, same functions), on disk and in a new process, through the API and the CLI; encodings
made under other settings, or damaged, are refused in one line."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from parallelcomp_triton import Calibration, ParallelComp, ParallelCompConfig, ParallelCompError
from parallelcomp_triton.encode import EncodedDocument
from parallelcomp_triton.run import main
from _tiny_pipeline import tiny_pc

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
# "Hm" is shorter than the score window (8): its chunks score with a window of its own length.
QUESTIONS = ["Which word comes first?", "What is the last word in the text?", "Hm", "Which word is last? It is"]


def document(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


DOC = document(260, seed=3)

CONFIGS = {
    "budget_chat_k2_b3": ParallelCompConfig(chunk_tokens=97, keep_chunks=2, kv_budget=16, batch_chunks=3,
                                            max_new_tokens=8, template="chat"),
    "no_budget_k3_b1": ParallelCompConfig(chunk_tokens=97, keep_chunks=3, kv_budget=None, batch_chunks=1,
                                          max_new_tokens=8, template="plain"),
    "calibration_k2_b3": ParallelCompConfig(chunk_tokens=80, keep_chunks=2, kv_budget=24, batch_chunks=3,
                                            max_new_tokens=8, instruction="Read this.", template="plain",
                                            calibration=Calibration(region="sink", first_layer=1, last_layer=2,
                                                                    tau=0.02, rows=2, region_tokens=30)),
    "k1_b1_suffix": ParallelCompConfig(chunk_tokens=120, keep_chunks=1, kv_budget=12, batch_chunks=1,
                                       max_new_tokens=8, score_tokens="suffix", template="plain"),
    # the default template (chat here) with a cue question: the answer's start opens the assistant's turn
    "auto_cue_k2_b2": ParallelCompConfig(chunk_tokens=97, keep_chunks=2, kv_budget=16, batch_chunks=2,
                                         max_new_tokens=8),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pc():
    return tiny_pc()


def assert_same(encoded, fresh, exact_nll=True):
    assert encoded.token_ids == fresh.token_ids
    assert encoded.text == fresh.text
    for key in ("chunk_spans", "kept_chunks", "kv_tokens_per_layer_before", "kv_tokens_per_layer_after",
                "question_position", "prefix_tokens", "question_tokens", "document_tokens"):
        assert encoded.stats[key] == fresh.stats[key], key
    if exact_nll:
        assert encoded.stats["chunk_nll_all"] == fresh.stats["chunk_nll_all"]
    else:
        assert encoded.stats["chunk_nll_all"] == pytest.approx(fresh.stats["chunk_nll_all"], abs=1e-4)
    assert sorted(encoded.kept_positions) == sorted(fresh.kept_positions)
    for c in fresh.kept_positions:
        # .cpu(): benchmarks/gpu_check.py compares a GPU run with a CPU one through this too
        assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(encoded.kept_positions[c], fresh.kept_positions[c]))
    assert encoded.stats.get("calibration_masked_per_head") == fresh.stats.get("calibration_masked_per_head")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoded_equals_fresh(pc, name):
    cfg = CONFIGS[name]
    with pc.encode(DOC, cfg) as encoded:
        assert len(encoded.spans) >= 5
        for question in QUESTIONS:
            fresh = pc.generate(DOC, question, config=cfg)
            got = pc.generate(encoded, question, config=cfg)
            assert_same(got, fresh)
            assert got.stats["encoding"] == str(encoded.path) and "encoding" not in fresh.stats
            assert len(fresh.token_ids) > 0
        if cfg.kv_budget is not None:
            assert fresh.kept_positions


def test_encoded_chunk_nll_equals_plain_causal_nll(pc):
    """The stored K/V and last hidden state, scored at their positions, give each chunk the question NLL of
    one plain causal pass over prefix + chunk + suffix (the ground truth chunk ranking rests on)."""
    cfg = CONFIGS["calibration_k2_b3"]
    question = QUESTIONS[0]
    with pc.encode(DOC, cfg) as encoded:
        res = pc.generate(encoded, question, config=cfg)
    toks = pc.prepare(cfg, DOC, question).toks
    a, b = toks.question
    assert toks.prefix
    for (s, e), nll in zip(res.stats["chunk_spans"], res.stats["chunk_nll_all"]):
        ids = toks.prefix + toks.document[s:e] + toks.suffix
        logits = pc.model.logits(torch.tensor([ids]))[0]
        q0 = len(ids) - len(toks.suffix)
        losses = torch.nn.functional.cross_entropy(logits[q0 - 1:-1], torch.tensor(toks.suffix), reduction="none")
        assert nll == pytest.approx(losses[a:b].mean().item(), rel=1e-4, abs=1e-5)


def test_generate_batch_with_encoded_documents(pc):
    cfg = CONFIGS["budget_chat_k2_b3"]
    docs = [DOC, document(150, seed=4), document(40, seed=5)]
    encodings = [pc.encode(d, cfg) for d in docs[:2]]
    try:
        pairs = [(encodings[0], QUESTIONS[0]), (encodings[1], QUESTIONS[2]), (encodings[0], QUESTIONS[1])]
        mixed = [(encodings[0], QUESTIONS[0]), (docs[2], QUESTIONS[1]), (encodings[1], QUESTIONS[2])]
        for batch in (pairs, mixed):
            results = pc.generate_batch(batch, config=cfg)
            for (context, question), got in zip(batch, results):
                text = docs[encodings.index(context)] if isinstance(context, EncodedDocument) else context
                # Chunks of several documents share score batches: equal up to float rounding, as for text.
                assert_same(got, pc.generate(text, question, config=cfg), exact_nll=False)
                assert_same(got, pc.generate(context, question, config=cfg), exact_nll=False)
                assert got.stats["batch_documents"] == 3
    finally:
        for e in encodings:
            e.close()


def test_temporary_encoding_is_removed_and_save_is_atomic(pc, tmp_path):
    cfg = CONFIGS["no_budget_k3_b1"]
    encoded = pc.encode(DOC, cfg)
    temp = encoded.path
    assert (temp / "meta.json").is_file() and (temp / "chunk_00000.safetensors").is_file()
    saved = encoded.save(tmp_path / "enc")
    encoded.close()
    assert not temp.exists() and not temp.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]  # no temporary sibling left behind
    names = sorted(p.name for p in saved.path.iterdir())
    assert names[-1] == "meta.json" and names[0] == "chunk_00000.safetensors" and "prefix.safetensors" not in names
    res = pc.generate(pc.load_encoded(saved.path), QUESTIONS[0], config=cfg)
    assert_same(res, pc.generate(DOC, QUESTIONS[0], config=cfg))
    # Encoding again into the same directory replaces it; a directory holding something else is refused.
    pc.encode(document(30, seed=1), cfg, path=saved.path)
    assert pc.load_encoded(saved.path).meta["document"] != saved.meta["document"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ParallelCompError, match="not an encoding"):
        pc.encode(DOC, cfg, path=other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("name", ["budget_chat_k2_b3", "no_budget_k3_b1"])
def test_next_batch_is_read_ahead_while_this_one_is_scored(pc, monkeypatch, name):
    """Every chunk file of the encoding but the first batch's is handed to the read-ahead once, the next
    batch's before this batch's K/V is loaded (so a cold encoding is read on another core while this batch
    is scored); the answer is the same as without it."""
    import parallelcomp_triton.encode as encode
    import parallelcomp_triton.pipeline as pipeline

    cfg = CONFIGS[name]
    events = []
    monkeypatch.setattr(pipeline, "read_ahead", lambda paths: events.extend(("ahead", p.name) for p in paths))
    load_chunk = EncodedDocument.load_chunk
    monkeypatch.setattr(EncodedDocument, "load_chunk",
                        lambda self, c, device="cpu": events.append(("load", encode.chunk_file(c)))
                        or load_chunk(self, c, device))
    with pc.encode(DOC, cfg) as encoded:
        events.clear()
        got = pc.generate(encoded, QUESTIONS[1], config=cfg)
        n = len(encoded.spans)
    files = [encode.chunk_file(c) for c in range(n)]
    b = cfg.batch_chunks
    assert [f for kind, f in events if kind == "ahead"] == files[b:]
    assert [f for kind, f in events if kind == "load"] == files
    for c, f in enumerate(files):
        ahead_by_then = {g for kind, g in events[:events.index(("load", f))] if kind == "ahead"}
        assert ahead_by_then == set(files[b:(c // b + 2) * b]), f  # up to the end of the next batch
    assert_same(got, pc.generate(DOC, QUESTIONS[1], config=cfg))


def test_read_ahead_reads_whole_files_and_ignores_missing_ones(tmp_path, monkeypatch):
    """Each file is passed through whole (sendfile to /dev/null, or reads where that fails); a missing file
    and a directory are skipped without an error; with one CPU the kernel is advised instead."""
    import parallelcomp_triton.encode as encode

    data = os.urandom(3 * 1000 + 17)
    (tmp_path / "a").write_bytes(data)
    paths = [tmp_path / "missing", tmp_path / "a", tmp_path]
    sent, reads = [], []
    real_sendfile = os.sendfile

    def sendfile(out, fd, offset, count):
        n = real_sendfile(out, fd, offset, count)
        sent.append((offset, n))
        return n

    monkeypatch.setattr(encode.os, "sendfile", sendfile)
    encode._read_through(paths, block=1000)
    assert [o for o, _ in sent] == [0, 1000, 2000, 3000] and sum(n for _, n in sent) == len(data)

    class Spy:  # the fallback: reads
        def __init__(self, path, mode, buffering):
            self.f = open(path, mode, buffering=buffering)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

        def readinto(self, buf):
            n = self.f.readinto(buf)
            reads.append(n)
            return n

    def no_sendfile(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(encode.os, "sendfile", no_sendfile)
    monkeypatch.setattr(encode, "open", Spy, raising=False)
    encode._read_through(paths, block=1000)
    assert sum(reads) == len(data) and reads[-1] == 0
    encode._advise_will_need([tmp_path / "missing", tmp_path / "a"])  # advice: a missing file is no error
    # With one CPU there is no core to read on: the kernel is advised instead, no thread started.
    monkeypatch.setattr(encode.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    advised = []
    monkeypatch.setattr(encode, "_advise_will_need", advised.append)
    monkeypatch.setattr(encode, "_READER", None)
    encode.read_ahead([tmp_path / "a"])
    assert advised == [[tmp_path / "a"]] and encode._READER is None


def test_read_ahead_drops_a_job_that_has_not_started_when_the_next_comes(tmp_path, monkeypatch):
    """The reader never falls more than one batch behind: a queued read the scoring has overtaken is dropped."""
    import threading

    import parallelcomp_triton.encode as encode

    monkeypatch.setattr(encode.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(encode, "_READER", None)
    monkeypatch.setattr(encode, "_QUEUED", [])
    started, gate, read = threading.Event(), threading.Event(), []

    def read_through(paths):
        started.set()
        gate.wait(10)
        read.append(paths)

    monkeypatch.setattr(encode, "_read_through", read_through)
    encode.read_ahead([tmp_path / "a"])
    assert started.wait(10)
    for name in "bcd":
        encode.read_ahead([tmp_path / name])
    gate.set()
    encode._READER.shutdown(wait=True)
    # "a" was running when "b" came, "b" and "c" were dropped while still queued, "d" is the newest.
    assert read == [[tmp_path / "a"], [tmp_path / "d"]]


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def test_refusals(pc, tmp_path):
    cfg = CONFIGS["calibration_k2_b3"]
    path = tmp_path / "enc"
    encoded = pc.encode(DOC, cfg, path=path)
    # Another model (same shapes and tokenizer, other weights), another dtype.
    other = tiny_pc(seed=1)
    for action in (lambda: other.load_encoded(path), lambda: other.generate(encoded, "Q?", config=cfg)):
        with pytest.raises(ParallelCompError) as e:
            action()
        assert "another model" in one_line(e)
    bf16 = tiny_pc(dtype=torch.bfloat16)
    with pytest.raises(ParallelCompError) as e:
        bf16.load_encoded(path)
    assert "float32" in one_line(e) and "bfloat16" in one_line(e)
    # Another template prefix, other chunking, another mode.
    other_template = "plain" if cfg.template != "plain" else "chat"
    for changed, expect in (({"instruction": "Other task."}, "template prefix"),
                            ({"template": other_template}, "template prefix"),
                            ({"chunk_tokens": 81}, "chunk_tokens"), ({"snap_to_sentences": False}, "snap_to_sentences"),
                            ({"window": 2000}, "window"), ({"mode": "full"}, "parallelcomp")):
        bad = ParallelCompConfig(**{**cfg.__dict__, **changed})
        with pytest.raises(ParallelCompError) as e:
            pc.generate(encoded, "Q?", config=bad)
        assert expect in one_line(e), changed
    # ... which the encoding's own settings fix.
    fixed = encoded.config(ParallelCompConfig(instruction="Other task.", chunk_tokens=81, max_new_tokens=3))
    assert pc.generate(encoded, "Q?", config=fixed).stats["chunk_spans"] == [list(s) for s in encoded.spans]
    # A question that does not fit the window next to the encoding's longest chunk.
    with pytest.raises(ParallelCompError) as e:
        pc.generate(encoded, "why " * 1000, config=cfg)
    assert "window" in one_line(e)
    with pytest.raises(ParallelCompError) as e:
        pc.encode(DOC, ParallelCompConfig(chunk_tokens=None))
    assert "chunk_tokens" in one_line(e)

    def damaged(name, damage):
        copy = tmp_path / name
        shutil.copytree(path, copy)
        damage(copy)
        with pytest.raises(ParallelCompError) as e:
            pc.load_encoded(copy)
        return one_line(e)

    def truncate(d):
        f = d / "chunk_00002.safetensors"
        f.write_bytes(f.read_bytes()[:-100])

    def garble_header(d):
        f = d / "chunk_00001.safetensors"
        data = bytearray(f.read_bytes())
        data[8:40] = b"x" * 32
        f.write_bytes(bytes(data))

    assert "truncated" in damaged("truncated", truncate)
    assert "chunk_00001" in damaged("garbled", garble_header)
    assert "missing" in damaged("missing", lambda d: (d / "chunk_00003.safetensors").unlink())
    assert "no meta.json" in damaged("half", lambda d: (d / "meta.json").unlink())
    assert "version" in damaged("version", lambda d: (d / "meta.json").write_text(
        json.dumps({**json.loads((d / "meta.json").read_text()), "version": 99})))
    with pytest.raises(ParallelCompError) as e:
        pc.load_encoded(tmp_path / "nothing")
    assert "no such directory" in one_line(e)


# ------------------------------------------------------------------------------- new process and CLI


def run(*args, **kw):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


LOAD_AND_ANSWER = """
import json, sys
from parallelcomp_triton import ParallelComp, ParallelCompConfig
pc = ParallelComp.from_pretrained(sys.argv[1], dtype="float32")
encoded = pc.load_encoded(sys.argv[2])
cfg = ParallelCompConfig(**json.loads(sys.argv[3]))
for q in json.loads(sys.argv[4]):
    r = pc.generate(encoded, q, config=cfg)
    print(json.dumps({"token_ids": r.token_ids, "nll": r.stats["chunk_nll_all"], "kept": r.stats["kept_chunks"],
                      "positions": {c: [p.tolist() for p in ps] for c, ps in r.kept_positions.items()}}))
"""


def test_saved_encoding_answers_alike_in_a_new_process(model_dir, tmp_path):
    fields = dict(chunk_tokens=90, keep_chunks=2, kv_budget=16, batch_chunks=3, max_new_tokens=6, template="chat")
    cfg = ParallelCompConfig(**fields)
    pc = ParallelComp.from_pretrained(model_dir, dtype="float32")
    pc.encode(DOC, cfg, path=tmp_path / "enc")
    proc = run("-c", LOAD_AND_ANSWER, str(model_dir), str(tmp_path / "enc"), json.dumps(fields), json.dumps(QUESTIONS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == len(QUESTIONS)
    for q, got in zip(QUESTIONS, lines):
        fresh = pc.generate(DOC, q, config=cfg)
        assert got["token_ids"] == fresh.token_ids and got["kept"] == fresh.stats["kept_chunks"]
        assert got["nll"] == fresh.stats["chunk_nll_all"]
        assert {int(c): p for c, p in got["positions"].items()} == \
               {c: [t.tolist() for t in ps] for c, ps in fresh.kept_positions.items()}


CLI_CONFIG = ["--chunk-tokens", "90", "--keep-chunks", "2", "--kv-budget", "16", "--max-new-tokens", "6",
              "--batch-chunks", "3", "--template", "chat", "--no-progress"]


def test_cli_many_questions_from_one_encoding(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    qfile = tmp_path / "questions.txt"
    qfile.write_text("\n".join(QUESTIONS[1:]) + "\n\n")
    model = ["--model", str(model_dir), "--dtype", "float32"]
    fresh = []
    for q in QUESTIONS:
        assert main([*model, "--input", str(doc), "--question", q, "--json", *CLI_CONFIG]) == 0
        fresh.append(json.loads(capsys.readouterr().out))
    # One encoding (temporary), three questions: --question and --questions together, JSON lines in order.
    assert main([*model, "--input", str(doc), "--question", QUESTIONS[0], "--questions", str(qfile), "--json",
                 *CLI_CONFIG]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["question"] for o in out] == QUESTIONS
    assert [o["token_ids"] for o in out] == [f["token_ids"] for f in fresh]
    assert [o["stats"]["chunk_nll_all"] for o in out] == [f["stats"]["chunk_nll_all"] for f in fresh]
    # Saved, then answered from the saved encoding in a new process (dtype and chunking from the encoding).
    enc = tmp_path / "doc.enc"
    assert main([*model, "--input", str(doc), "--questions", str(qfile), "--save-encoding", str(enc),
                 *CLI_CONFIG]) == 0
    text_answers = capsys.readouterr().out.splitlines()
    assert text_answers == [" ".join(f["answer"].splitlines()).strip() for f in fresh[1:]]
    assert (enc / "meta.json").is_file()
    args = ["-m", "parallelcomp_triton.run", "--model", str(model_dir), "--encoding", str(enc), "--json",
            "--max-new-tokens", "6", "--keep-chunks", "2", "--kv-budget", "16", "--no-progress"]
    for q in QUESTIONS:
        args += ["--question", q]
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["token_ids"] for o in out] == [f["token_ids"] for f in fresh]
    assert [o["stats"]["kept_chunks"] for o in out] == [f["stats"]["kept_chunks"] for f in fresh]
    assert all(o["stats"]["dtype"] == "float32" for o in out)


def test_cli_encoding_errors_are_one_line_exit_2(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    half = tmp_path / "half"
    half.mkdir()
    (half / "chunk_00000.safetensors").write_bytes(b"")
    model = ["--model", str(model_dir), "--dtype", "float32"]
    cases = [
        ([*model, "--encoding", str(half), "--question", "q"], "no meta.json"),
        ([*model, "--encoding", str(tmp_path / "none"), "--question", "q"], "no such directory"),
        ([*model, "--encoding", str(half)], "--question is required"),
        ([*model, "--encoding", str(half), "--input", str(doc), "--question", "q"], "not allowed with"),
        ([*model, "--save-encoding", str(tmp_path / "e"), "--demo"], "--save-encoding needs --input"),
        ([*model, "--input", str(doc), "--question", "q", "--save-encoding", str(tmp_path / "e"), "--distributed"],
         "--distributed"),
        ([*model, "--input", str(doc), "--questions", str(tmp_path / "missing.txt")], "no such file"),
        ([*model, "--input", str(doc), "--question", "q", "--question", "why " * 2000, "--chunk-tokens", "90"],
         "window"),
    ]
    for argv, expect in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and expect in lines[0], (argv, captured.err)
        assert captured.out == ""
    # An encoding made in float32 refused by a model loaded in bfloat16.
    enc = tmp_path / "enc"
    assert main([*model, "--input", str(doc), "--question", "q", "--save-encoding", str(enc), *CLI_CONFIG]) == 0
    capsys.readouterr()
    assert main(["--model", str(model_dir), "--dtype", "bfloat16", "--encoding", str(enc), "--question", "q",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float32" in err[0]
