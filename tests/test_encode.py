"""Encode a document once, answer many questions: an encoded answer equals a fresh one exactly (same chunk
K/V, same batches, same functions), on disk and in a new process, through the API and the CLI; encodings
made under other settings, or damaged, are refused in one line."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from _cases import (CASES, DOCUMENTS, EXTRA_CASES, QUESTIONS, assert_same, case, changed_fields, cli_args, params,
                    raises_one_line)
from _tiny_pipeline import tiny_pc
from parallelcomp_triton import ParallelComp, ParallelCompConfig, ParallelCompError
from parallelcomp_triton.run import main
from parallelcomp_triton.storage import EncodedDocument

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pc():
    return tiny_pc()


@pytest.mark.parametrize("c", params(c for c in CASES + EXTRA_CASES if c.config.mode == "parallelcomp"))
def test_encoded_equals_fresh(pc, c):
    cfg = c.config
    with pc.encode(c.context, cfg) as encoded:
        assert len(encoded.spans) >= 5
        for question in dict.fromkeys([c.question, *QUESTIONS]):
            fresh = pc.generate(c.context, question, config=cfg)
            got = pc.generate(encoded, question, config=cfg)
            assert_same(got, fresh)
            assert got.stats.encoding == str(encoded.path) and fresh.stats.encoding is None
            assert len(fresh.token_ids) > 0
        if cfg.kv_budget is not None:
            assert fresh.kept_positions


def test_encoded_chunk_nll_equals_plain_causal_nll(pc):
    """The stored K/V and last hidden state, scored at their positions, give each chunk the question NLL of
    one plain causal pass over prefix + chunk + suffix (the ground truth chunk ranking rests on)."""
    c = case("calibration_k2_b3")
    with pc.encode(c.context, c.config) as encoded:
        res = pc.generate(encoded, c.question, config=c.config)
    toks = pc.plan(c.context, c.question, c.config).toks
    a, b = toks.question
    assert toks.prefix
    for (s, e), nll in zip(res.stats.chunk_spans, res.stats.chunk_nll_all):
        ids = toks.prefix + toks.document[s:e] + toks.suffix
        logits = pc.model.logits(torch.tensor([ids]))[0]
        q0 = len(ids) - len(toks.suffix)
        losses = torch.nn.functional.cross_entropy(logits[q0 - 1:-1], torch.tensor(toks.suffix), reduction="none")
        assert nll == pytest.approx(losses[a:b].mean().item(), rel=1e-4, abs=1e-5)


def test_generate_batch_with_encoded_documents(pc):
    c = case("budget_chat_k2_b3")
    cfg = c.config
    docs = [c.context, DOCUMENTS["d90"], DOCUMENTS["d12"]]
    encodings = [pc.encode(d, cfg) for d in docs[:2]]
    try:
        encoded = [(encodings[0], QUESTIONS[0]), (encodings[1], QUESTIONS[2]), (encodings[0], QUESTIONS[1])]
        mixed = [(encodings[0], QUESTIONS[0]), (docs[2], QUESTIONS[1]), (encodings[1], QUESTIONS[2])]
        for batch in (encoded, mixed):
            results = pc.generate_batch(batch, config=cfg)
            for (context, question), got in zip(batch, results):
                text = docs[encodings.index(context)] if isinstance(context, EncodedDocument) else context
                # Chunks of several documents share score batches: equal up to float rounding, as for text.
                assert_same(got, pc.generate(text, question, config=cfg), exact_nll=False)
                assert_same(got, pc.generate(context, question, config=cfg), exact_nll=False)
                assert got.stats.batch_documents == 3
    finally:
        for e in encodings:
            e.close()


def test_temporary_encoding_is_removed_and_save_is_atomic(pc, tmp_path):
    c = case("no_budget_k3_b1")
    cfg, doc = c.config, c.context
    encoded = pc.encode(doc, cfg)
    temp = encoded.path
    assert (temp / "meta.json").is_file() and (temp / "chunk_00000.safetensors").is_file()
    saved = encoded.save(tmp_path / "enc")
    encoded.close()
    assert not temp.exists() and not temp.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]  # no temporary sibling left behind
    names = sorted(p.name for p in saved.path.iterdir())
    assert names[-1] == "meta.json" and names[0] == "chunk_00000.safetensors" and "prefix.safetensors" not in names
    res = pc.generate(pc.load_encoded(saved.path), c.question, config=cfg)
    assert_same(res, pc.generate(doc, c.question, config=cfg))
    # Encoding again into the same directory replaces it; a directory holding something else is refused.
    pc.encode(DOCUMENTS["d12"], cfg, path=saved.path)
    assert pc.load_encoded(saved.path).meta["document"] != saved.meta["document"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ParallelCompError, match="not an encoding"):
        pc.encode(doc, cfg, path=other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("c", params(map(case, ["budget_chat_k2_b3", "no_budget_k3_b1"])))
def test_next_batch_is_read_ahead_while_this_one_is_scored(pc, monkeypatch, c):
    """Every chunk file of the encoding but the first batch's is handed to the read-ahead once, the next
    batch's before this batch's K/V is loaded (so a cold encoding is read on another core while this batch
    is scored); the answer is the same as without it."""
    import parallelcomp_triton.storage as storage

    cfg = c.config
    events = []
    monkeypatch.setattr(pc.read_ahead, "submit", lambda paths: events.extend(("ahead", p.name) for p in paths))
    load_chunk = EncodedDocument.load_chunk
    monkeypatch.setattr(EncodedDocument, "load_chunk",
                        lambda self, i, device="cpu": events.append(("load", storage.chunk_file(i)))
                        or load_chunk(self, i, device))
    with pc.encode(c.context, cfg) as encoded:
        events.clear()
        got = pc.generate(encoded, QUESTIONS[1], config=cfg)
        n = len(encoded.spans)
    files = [storage.chunk_file(i) for i in range(n)]
    b = cfg.batch_chunks
    assert [f for kind, f in events if kind == "ahead"] == files[b:]
    assert [f for kind, f in events if kind == "load"] == files
    for i, f in enumerate(files):
        ahead_by_then = {g for kind, g in events[:events.index(("load", f))] if kind == "ahead"}
        assert ahead_by_then == set(files[b:(i // b + 2) * b]), f  # up to the end of the next batch
    assert_same(got, pc.generate(c.context, QUESTIONS[1], config=cfg))


def test_read_ahead_reads_whole_files_and_ignores_missing_ones(tmp_path, monkeypatch):
    """Each file is read whole, in block-sized reads, and its checksum left for its load (which takes it
    once); a missing file and a directory are skipped without an error and leave nothing; with one CPU the
    kernel is advised instead."""
    import zlib

    import parallelcomp_triton.read_ahead as read_ahead

    data = os.urandom(3 * 1000 + 17)
    (tmp_path / "a").write_bytes(data)
    paths = [tmp_path / "missing", tmp_path / "a", tmp_path]
    reads = []

    class Spy:
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

    monkeypatch.setattr(read_ahead, "open", Spy, raising=False)
    table = read_ahead.Checksums()
    read_ahead.read_through(paths, block=1000, table=table)
    assert reads == [1000, 1000, 1000, 17, 0]
    identity, crc = table.take(str(tmp_path / "a"))
    assert crc == f"{zlib.crc32(data):08x}" and identity == read_ahead.file_identity((tmp_path / "a").stat())
    assert table.take(str(tmp_path / "a")) is None  # taken once
    assert table.take(str(tmp_path / "missing")) is None and table.take(str(tmp_path)) is None
    read_ahead.advise_will_need([tmp_path / "missing", tmp_path / "a"])  # advice: a missing file is no error
    # With one CPU there is no core to read on: the kernel is advised instead, no thread started.
    monkeypatch.setattr(read_ahead.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    advised = []
    monkeypatch.setattr(read_ahead, "advise_will_need", advised.append)
    reader = read_ahead.ReadAhead()
    reader.submit([tmp_path / "a"])
    assert advised == [[tmp_path / "a"]] and reader.pool is None


def test_read_ahead_drops_a_job_that_has_not_started_when_the_next_comes(tmp_path, monkeypatch):
    """The reader never falls more than one batch behind: a queued read the scoring has overtaken is dropped."""
    import threading

    import parallelcomp_triton.read_ahead as read_ahead

    monkeypatch.setattr(read_ahead.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    reader = read_ahead.ReadAhead(read_ahead.Checksums())
    started, gate, read = threading.Event(), threading.Event(), []

    def read_through(paths, generation, table):
        started.set()
        gate.wait(10)
        read.append(paths)

    monkeypatch.setattr(read_ahead, "read_through", read_through)
    reader.submit([tmp_path / "a"])
    assert started.wait(10)
    for name in "bcd":
        reader.submit([tmp_path / name])
    gate.set()
    reader.pool.shutdown(wait=True)
    # "a" was running when "b" came, "b" and "c" were dropped while still queued, "d" is the newest.
    assert read == [[tmp_path / "a"], [tmp_path / "d"]]
    # The dropped jobs' files are left to their loads (not waited for); the others were marked for the reader.
    assert set(reader.table.table) == {str(tmp_path / "a"), str(tmp_path / "d")}


REFUSAL_CASE = case("calibration_k2_b3")


@pytest.fixture(scope="module")
def saved(pc, tmp_path_factory):
    """An encoding on disk, made under REFUSAL_CASE's settings; tests copy it before damaging it."""
    path = tmp_path_factory.mktemp("refusals") / "enc"
    pc.encode(REFUSAL_CASE.context, REFUSAL_CASE.config, path=path)
    return path


def test_another_model_or_dtype_is_refused(pc, saved):
    cfg = REFUSAL_CASE.config
    encoded = pc.load_encoded(saved)
    # Another model: same shapes and tokenizer, other weights.
    other = tiny_pc(seed=1)
    raises_one_line(lambda: other.load_encoded(saved), "another model")
    raises_one_line(lambda: other.generate(encoded, "Q?", config=cfg), "another model")
    raises_one_line(lambda: tiny_pc(dtype=torch.bfloat16).load_encoded(saved), "float32", "bfloat16")


# id, settings changed from the encoding's, words of the one-line refusal
OTHER_SETTINGS = [
    ("instruction", {"instruction": "Other task."}, ["template prefix"]),
    ("template", {"template": "chat" if REFUSAL_CASE.config.template == "plain" else "plain"}, ["template prefix"]),
    ("chunk_tokens", {"chunk_tokens": 81}, ["chunk_tokens"]),
    ("snap_to_sentences", {"snap_to_sentences": False}, ["snap_to_sentences"]),
    ("window", {"window": 2000}, ["window"]),
    ("mode", {"mode": "full"}, ["parallelcomp"]),
]


@pytest.mark.parametrize("changed,words", [pytest.param(*row, id=i) for i, *row in OTHER_SETTINGS])
def test_encoding_made_under_other_settings_is_refused(pc, saved, changed, words):
    bad = ParallelCompConfig(**{**REFUSAL_CASE.config.__dict__, **changed})
    raises_one_line(lambda: pc.generate(pc.load_encoded(saved), "Q?", config=bad), *words)


def test_the_encodings_own_settings_fix_a_config(pc, saved):
    encoded = pc.load_encoded(saved)
    fixed = encoded.config(ParallelCompConfig(instruction="Other task.", chunk_tokens=81, max_new_tokens=3))
    assert pc.generate(encoded, "Q?", config=fixed).stats.chunk_spans == [list(s) for s in encoded.spans]


def test_question_past_the_window_and_unbounded_chunks_are_refused(pc, saved):
    # A question that does not fit the window next to the encoding's longest chunk.
    raises_one_line(lambda: pc.generate(pc.load_encoded(saved), "why " * 1000, config=REFUSAL_CASE.config),
                    "window")
    raises_one_line(lambda: pc.encode(REFUSAL_CASE.context, ParallelCompConfig(chunk_tokens=None)), "chunk_tokens")


def _truncate(d):
    f = d / "chunk_00002.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _garble_header(d):
    f = d / "chunk_00001.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"x" * 32
    f.write_bytes(bytes(data))


def _meta_version(d):
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "version": 99}))


def _version_1(d):
    """meta.json as the format before checksums wrote it (sizes only)."""
    meta = json.loads((d / "meta.json").read_text())
    meta.update(version=1, files={name: f["bytes"] for name, f in meta["files"].items()})
    (d / "meta.json").write_text(json.dumps(meta))


def _no_checksum(d):
    meta = json.loads((d / "meta.json").read_text())
    del meta["files"]["chunk_00002.safetensors"]["crc32"]
    (d / "meta.json").write_text(json.dumps(meta))


# id, what is done to a saved encoding, words of the one-line refusal
DAMAGED = [
    ("truncated", _truncate, ["truncated"]),
    ("garbled_header", _garble_header, ["chunk_00001"]),
    ("missing_chunk", lambda d: (d / "chunk_00003.safetensors").unlink(), ["missing"]),
    ("no_meta", lambda d: (d / "meta.json").unlink(), ["no meta.json"]),
    ("other_version", _meta_version, ["version"]),
    ("version_1", _version_1, ["format version 1", "encode the document again"]),
    ("no_checksum", _no_checksum, ["chunk_00002", "checksum"]),
    ("no_directory", shutil.rmtree, ["no such directory"]),
]


@pytest.mark.parametrize("damage,words", [pytest.param(*row, id=i) for i, *row in DAMAGED])
def test_damaged_encoding_is_refused(pc, saved, tmp_path, damage, words):
    copy = tmp_path / "enc"
    shutil.copytree(saved, copy)
    damage(copy)
    raises_one_line(lambda: pc.load_encoded(copy), *words)


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
    print(json.dumps({"token_ids": r.token_ids, "nll": r.stats.chunk_nll_all, "kept": r.stats.kept_chunks,
                      "positions": {c: [p.tolist() for p in ps] for c, ps in r.kept_positions.items()}}))
"""


def test_saved_encoding_answers_alike_in_a_new_process(model_dir, tmp_path):
    c = case("budget_chat_k2_b3")
    cfg = c.config
    pc = ParallelComp.from_pretrained(model_dir, dtype="float32")
    pc.encode(c.context, cfg, path=tmp_path / "enc")
    fields = changed_fields(cfg)
    proc = run("-c", LOAD_AND_ANSWER, str(model_dir), str(tmp_path / "enc"), json.dumps(fields), json.dumps(QUESTIONS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == len(QUESTIONS)
    for q, got in zip(QUESTIONS, lines):
        fresh = pc.generate(c.context, q, config=cfg)
        assert got["token_ids"] == fresh.token_ids and got["kept"] == fresh.stats.kept_chunks
        assert got["nll"] == fresh.stats.chunk_nll_all
        assert {int(c): p for c, p in got["positions"].items()} == \
               {c: [t.tolist() for t in ps] for c, ps in fresh.kept_positions.items()}


CLI_CASE = case("budget_chat_k2_b3")
CLI_CONFIG = cli_args(CLI_CASE.config)


def test_cli_many_questions_from_one_encoding(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(CLI_CASE.context)
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
            *cli_args(CLI_CASE.config, only=("max_new_tokens", "keep_chunks", "kv_budget"))]
    for q in QUESTIONS:
        args += ["--question", q]
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["token_ids"] for o in out] == [f["token_ids"] for f in fresh]
    assert [o["stats"]["kept_chunks"] for o in out] == [f["stats"]["kept_chunks"] for f in fresh]
    assert all(o["stats"]["dtype"] == "float32" for o in out)


# id, arguments after --model ("{doc}": a document, "{half}": an encoding without meta.json, "{tmp}": an empty
# directory), words of the one-line error
CLI_ERRORS = [
    ("no_meta", ["--encoding", "{half}", "--question", "q"], "no meta.json"),
    ("no_directory", ["--encoding", "{tmp}/none", "--question", "q"], "no such directory"),
    ("no_question", ["--encoding", "{half}"], "--question is required"),
    ("encoding_and_input", ["--encoding", "{half}", "--input", "{doc}", "--question", "q"], "not allowed with"),
    ("save_without_input", ["--save-encoding", "{tmp}/e", "--demo"], "--save-encoding needs one --input"),
    ("save_distributed", ["--input", "{doc}", "--question", "q", "--save-encoding", "{tmp}/e", "--distributed"],
     "--distributed"),
    ("no_questions_file", ["--input", "{doc}", "--questions", "{tmp}/missing.txt"], "no such file"),
    ("question_past_window", ["--input", "{doc}", "--question", "q", "--question", "why " * 2000, *CLI_CONFIG],
     "window"),
]


@pytest.mark.parametrize("args,expect", [pytest.param(*row, id=i) for i, *row in CLI_ERRORS])
def test_cli_encoding_errors_are_one_line_exit_2(model_dir, tmp_path, capsys, args, expect):
    doc = tmp_path / "doc.txt"
    doc.write_text(CLI_CASE.context)
    half = tmp_path / "half"
    half.mkdir()
    (half / "chunk_00000.safetensors").write_bytes(b"")
    argv = ["--model", str(model_dir), "--dtype", "float32",
            *(a.format(doc=doc, half=half, tmp=tmp_path) for a in args)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and expect in lines[0], captured.err
    assert captured.out == ""


def test_cli_refuses_an_encoding_of_another_dtype(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(CLI_CASE.context)
    model = ["--model", str(model_dir), "--dtype", "float32"]
    # An encoding made in float32 refused by a model loaded in bfloat16.
    enc = tmp_path / "enc"
    assert main([*model, "--input", str(doc), "--question", "q", "--save-encoding", str(enc), *CLI_CONFIG]) == 0
    capsys.readouterr()
    assert main(["--model", str(model_dir), "--dtype", "bfloat16", "--encoding", str(enc), "--question", "q",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float32" in err[0]
