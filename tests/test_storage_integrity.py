"""Every stored file carries a checksum (crc32 in meta.json) that is verified before its K/V is used: a chunk
or prefix file with bytes flipped inside its tensors is refused in one line (API and CLI, with and without
the read-ahead), never answered from; an intact encoding answers exactly as before; a copy passes no damage
on; an encoding of the format before checksums is refused."""
import json
import os
import shutil
import subprocess
import sys
import zlib

import pytest

from _cases import assert_same, case, cli_args, raises_one_line
from parallelcomp_triton import ParallelComp
from parallelcomp_triton import read_ahead as read_ahead_module
from parallelcomp_triton import storage
from parallelcomp_triton.run import main
from parallelcomp_triton.storage import EncodedDocument, chunk_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A chat-template prefix and batches of 3 chunks: chunk 1 is in the first batch (read by its load), chunk 4
# in the second (read ahead while the first is scored).
CASE = case("budget_chat_k2_b3")
CFG = CASE.config
QUESTION = CASE.question
FIRST_BATCH, LATER_BATCH = 1, 4


@pytest.fixture(scope="module")
def pc(model_dir):
    return ParallelComp.from_pretrained(model_dir, dtype="float32")


@pytest.fixture(scope="module")
def saved(pc, tmp_path_factory):
    """An encoding on disk and the answer it gives; tests copy it before damaging it."""
    path = tmp_path_factory.mktemp("integrity") / "enc"
    encoded = pc.encode(CASE.context, CFG, path=path)
    assert len(encoded.spans) > LATER_BATCH and encoded.prefix
    return path, pc.generate(CASE.context, QUESTION, config=CFG)


@pytest.fixture
def two_cpus(monkeypatch):
    """The read-ahead thread runs (it reads and checksums the next batch) whatever this machine has."""
    monkeypatch.setattr(read_ahead_module.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)


def copy_of(saved, tmp_path):
    copy = tmp_path / "enc"
    shutil.copytree(saved[0], copy)
    return copy


def flip(path, count=1000):
    """Flip `count` bytes (every bit) in the second half of the file: inside its tensors, past the header."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    start = max(header, len(data) // 2)
    count = min(count, len(data) - start)
    assert count > 0
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def answer(pc, path, read_ahead=True):
    saved_reader = pc.read_ahead
    if not read_ahead:
        pc.read_ahead = None
    try:
        return pc.generate(pc.load_encoded(path), QUESTION, config=CFG)
    finally:
        pc.read_ahead = saved_reader


def corrupt_words(name):
    return [f"{name} is corrupt (checksum mismatch)", "encode the document again"]


@pytest.mark.parametrize("read_ahead", [True, False], ids=["read_ahead", "no_read_ahead"])
def test_intact_encoding_answers_as_before(pc, saved, two_cpus, read_ahead):
    assert_same(answer(pc, saved[0], read_ahead), saved[1])
    meta = json.loads((saved[0] / "meta.json").read_text())
    assert meta["version"] == 2
    for name, listed in meta["files"].items():
        data = (saved[0] / name).read_bytes()
        assert listed == {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}


def test_flipped_bytes_reach_the_answer_without_the_check(pc, saved, tmp_path, monkeypatch):
    """The damage the tests below make is inside the K/V: unchecked, it changes the chunk NLLs (this is the
    silent wrong answer the checksums stop)."""
    copy = copy_of(saved, tmp_path)
    flip(copy / chunk_file(LATER_BATCH))
    monkeypatch.setattr(EncodedDocument, "verify", lambda self, name: None)
    got = answer(pc, copy)
    assert got.stats.chunk_nll_all[LATER_BATCH] != saved[1].stats.chunk_nll_all[LATER_BATCH]


@pytest.mark.parametrize("read_ahead", [True, False], ids=["read_ahead", "no_read_ahead"])
@pytest.mark.parametrize("chunk", [FIRST_BATCH, LATER_BATCH], ids=["first_batch", "later_batch"])
def test_flipped_chunk_is_refused(pc, saved, tmp_path, two_cpus, chunk, read_ahead):
    copy = copy_of(saved, tmp_path)
    flip(copy / chunk_file(chunk))
    pc.load_encoded(copy)  # loading checks sizes and headers only: the bytes are checked as they are read
    raises_one_line(lambda: answer(pc, copy, read_ahead), str(copy), *corrupt_words(chunk_file(chunk)))


def test_one_flipped_byte_in_the_prefix_is_refused(pc, saved, tmp_path, two_cpus):
    copy = copy_of(saved, tmp_path)
    flip(copy / "prefix.safetensors", count=1)
    raises_one_line(lambda: answer(pc, copy), *corrupt_words("prefix.safetensors"))


def test_read_ahead_verifies_the_later_batches(pc, saved, two_cpus, monkeypatch):
    """With the read-ahead, the loads read only the prefix and the first batch's files to verify them; the
    read-ahead's checksums vouch for the rest."""
    self_read = []
    real = storage.file_checksum
    monkeypatch.setattr(storage, "file_checksum", lambda path: self_read.append(path.name) or real(path))
    reader = pc.read_ahead
    submit = reader.submit

    def submit_and_wait(paths):  # the reader is never overtaken (a tiny model scores a batch in milliseconds)
        submit(paths)
        reader.queued[-1][0].result()

    monkeypatch.setattr(reader, "submit", submit_and_wait)
    encoded = pc.load_encoded(saved[0])
    assert_same(pc.generate(encoded, QUESTION, config=CFG), saved[1])
    assert sorted(self_read) == sorted(["prefix.safetensors", *map(chunk_file, range(CFG.batch_chunks))])
    self_read.clear()
    pc.read_ahead = None
    try:
        pc.generate(encoded, QUESTION, config=CFG)
    finally:
        pc.read_ahead = read_ahead_module.ReadAhead()
    assert sorted(self_read) == sorted(["prefix.safetensors", *map(chunk_file, range(len(encoded.spans)))])


def test_a_checksum_is_trusted_only_for_the_file_it_was_read_from(pc, saved, tmp_path):
    """A checksum the read-ahead left is used once, and only while the file is the one it read (same
    identity); a file changed since is read again by its load."""
    copy = copy_of(saved, tmp_path)
    encoded = pc.load_encoded(copy)
    name = chunk_file(LATER_BATCH)
    path = copy / name
    good = encoded.meta["files"][name]["crc32"]
    read_ahead_module.CHECKSUMS.clear()
    read_ahead_module.read_through([path])
    encoded.verify(name)  # the reader's checksum, taken
    assert read_ahead_module.CHECKSUMS.take(str(path)) is None
    read_ahead_module.read_through([path])
    flip(path)  # rewritten after the reader read it: another identity, read again
    raises_one_line(lambda: encoded.verify(name), *corrupt_words(name))
    # The reader's checksum, not the file's, decides while the identity matches.
    identity = read_ahead_module.file_identity(path.stat())
    read_ahead_module.CHECKSUMS.done(str(path), (identity, good), 0)
    encoded.verify(name)
    read_ahead_module.CHECKSUMS.done(str(path), (identity, "00000000"), 0)
    raises_one_line(lambda: encoded.verify(name), *corrupt_words(name))


def test_saving_a_damaged_encoding_passes_nothing_on(pc, saved, tmp_path):
    """A copy is checked as it is written: a damaged source is refused and the encoding already at the
    destination stays."""
    copy = copy_of(saved, tmp_path)
    flip(copy / chunk_file(LATER_BATCH))
    dest = tmp_path / "dest"
    pc.load_encoded(saved[0]).save(dest)
    raises_one_line(lambda: pc.load_encoded(copy).save(dest), *corrupt_words(chunk_file(LATER_BATCH)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "enc"]  # no temporary sibling left
    assert_same(answer(pc, dest), saved[1])
    again = pc.load_encoded(saved[0]).save(tmp_path / "again")  # an intact one copies with its checksums
    assert json.loads((tmp_path / "again" / "meta.json").read_text())["files"] == \
        json.loads((saved[0] / "meta.json").read_text())["files"]
    assert_same(answer(pc, again.path), saved[1])


def _version_1(d):
    """meta.json as the format before checksums wrote it: version 1, sizes only."""
    meta = json.loads((d / "meta.json").read_text())
    meta.update(version=1, files={name: f["bytes"] for name, f in meta["files"].items()})
    (d / "meta.json").write_text(json.dumps(meta))


def test_version_1_encoding_is_refused(pc, saved, tmp_path):
    copy = copy_of(saved, tmp_path)
    _version_1(copy)
    raises_one_line(lambda: pc.load_encoded(copy), "format version 1", "version 2", "encode the document again")


def test_meta_without_checksums_is_refused(pc, saved, tmp_path):
    copy = copy_of(saved, tmp_path)
    meta = json.loads((copy / "meta.json").read_text())
    meta["files"]["prefix.safetensors"] = meta["files"]["prefix.safetensors"]["bytes"]
    (copy / "meta.json").write_text(json.dumps(meta))
    raises_one_line(lambda: pc.load_encoded(copy), "prefix.safetensors", "checksum")


# ------------------------------------------------------------------------------- CLI


def test_cli_refuses_a_flipped_chunk_in_one_line(model_dir, saved, tmp_path, capsys, two_cpus):
    copy = copy_of(saved, tmp_path)
    flip(copy / chunk_file(LATER_BATCH))
    args = ["--model", str(model_dir), "--encoding", str(copy), "--question", QUESTION,
            *cli_args(CFG, only=("max_new_tokens", "keep_chunks", "kv_budget"))]
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert all(w in lines[0] for w in corrupt_words(chunk_file(LATER_BATCH))), lines[0]
    assert captured.out == ""
    # In a new process, as a user runs it.
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "parallelcomp_triton.run", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert all(w in lines[0] for w in corrupt_words(chunk_file(LATER_BATCH))), lines[0]
    assert proc.stdout == ""
