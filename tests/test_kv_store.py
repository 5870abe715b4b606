"""Encodings at one byte per stored K/V value (kv_store "int8"): the quantization's error bound, what the
files hold and weigh, answers read from them equal answers from the K/V they stand for, and the one-line
refusals."""
import json
import os
import shutil

import pytest
import torch

from _cases import CASES, QUESTIONS, assert_same, case, cli_args, params, raises_one_line
from _tiny_pipeline import tiny_pc
from parallelcomp_triton import ParallelCompConfig
from parallelcomp_triton.run import main
from parallelcomp_triton.serve_engine import store_fingerprint
from parallelcomp_triton.storage import AtomicDir, dequantize_int8, quantize_int8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pc():
    return tiny_pc()


def int8_config(cfg: ParallelCompConfig) -> ParallelCompConfig:
    return ParallelCompConfig(**{**cfg.__dict__, "kv_store": "int8"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [1, 2], ids=["per_channel", "per_token"])
@pytest.mark.parametrize("n", [1, 37, 300])
def test_quantize_int8_error_is_half_a_step(dtype, dim, n):
    g = torch.Generator().manual_seed(n * 10 + dim)
    x = torch.randn(3, n, 64, generator=g) * torch.rand(1, 1, 64, generator=g) * 4
    x[:, :, 5] *= 50  # an outlier channel, as keys have
    x[1, :, :] = 0  # an all-zero head: every slice of it exact
    x = x.to(dtype)
    q, scale = quantize_int8(x, dim)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.dtype == torch.float32
    assert scale.shape == tuple(1 if i == dim else s for i, s in enumerate(x.shape))
    assert q.abs().max() <= 127 and (q.abs().amax(dim=dim) == 127)[0].all()  # each slice's maximum hits 127
    got = dequantize_int8(q, scale, dtype)
    assert got.dtype == dtype
    err = (got.double() - x.double()).abs()
    # half a quantization step, plus the rounding of the result to `dtype`
    bound = scale.double() / 2 * (1 + 1e-6) + x.double().abs() * torch.finfo(dtype).eps
    assert (err <= bound).all()
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_int8_chunk_files_hold_one_byte_values_and_weigh_about_half(pc, tmp_path):
    c = case("budget_chat_k2_b3")
    exact = pc.encode(c.context, c.config, path=tmp_path / "exact")
    small = pc.encode(c.context, int8_config(c.config), path=tmp_path / "int8")
    assert (exact.kv_store, small.kv_store) == ("exact", "int8") and "int8" in repr(small)
    a = pc.model.args
    for i, (s, e) in enumerate(exact.spans):
        name = f"chunk_{i:05d}.safetensors"
        n = e - s
        payload = {"exact": 2 * a.num_layers * a.num_kv_heads * n * a.head_dim * 4,  # float32 K and V
                   "int8": a.num_layers * a.num_kv_heads * (2 * n * a.head_dim + 4 * a.head_dim + 4 * n)}
        sizes = {k: os.path.getsize(tmp_path / k / name) for k in payload}
        for k, size in sizes.items():  # payload, `hidden`, and a safetensors header of at most a few KiB
            assert 0 <= size - payload[k] - 4 * a.hidden_size < 8192, (k, size, payload[k])
        want, got = exact.load_chunk(i), small.load_chunk(i)
        assert torch.equal(got.hidden, want.hidden)
        for l in range(a.num_layers):
            for x, y, dim in ((want.keys[l], got.keys[l], 1), (want.values[l], got.values[l], 2)):
                assert y.dtype == x.dtype and y.shape == x.shape
                step = x.abs().amax(dim=dim, keepdim=True) / 127
                assert ((y - x).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    # The prefix is kept exact, byte for byte.
    if exact.prefix:
        assert (tmp_path / "exact/prefix.safetensors").read_bytes() == (tmp_path / "int8/prefix.safetensors").read_bytes()


def test_converting_an_exact_encoding_writes_the_files_encoding_in_int8_writes(pc, tmp_path):
    c = case("no_budget_k3_b1")
    exact = pc.encode(c.context, c.config)
    converted = exact.save(tmp_path / "converted", kv_store="int8")
    encoded = pc.encode(c.context, int8_config(c.config), path=tmp_path / "encoded")
    assert converted.meta == encoded.meta and converted.kv_store == "int8"
    for name in converted.meta["files"]:
        assert (tmp_path / "converted" / name).read_bytes() == (tmp_path / "encoded" / name).read_bytes(), name
    assert pc.load_encoded(tmp_path / "converted").meta == converted.meta
    raises_one_line(lambda: converted.save(tmp_path / "back", kv_store="exact"), "int8", "encode")
    raises_one_line(lambda: exact.save(tmp_path / "x", kv_store="int4"), "kv_store", "int4")
    assert not (tmp_path / "back").exists() and not (tmp_path / "x").exists()


def dequantized_copy(encoded, path):
    """An exact encoding whose chunk K/V are the int8 encoding's, dequantized: what answers from it read."""
    writer = AtomicDir(path)
    if encoded.prefix:
        writer.save_prefix(*encoded.load_prefix())
    for i in range(len(encoded.spans)):
        writer.save_chunk(i, encoded.load_chunk(i))
    writer.commit(dict(encoded.meta, settings=dict(encoded.meta["settings"], kv_store="exact")))


@pytest.mark.parametrize("c", params(c for c in CASES if c.config.mode == "parallelcomp"))
def test_answers_from_int8_read_its_dequantized_kv(pc, tmp_path, c):
    """An int8 encoding answers exactly as an exact encoding holding its dequantized K/V, and close to a fresh
    run (chunk NLLs within the quantization's reach)."""
    cfg = c.config
    small = pc.encode(c.context, int8_config(cfg), path=tmp_path / "int8")
    dequantized_copy(small, tmp_path / "copy")
    copy = pc.load_encoded(tmp_path / "copy")
    for question in dict.fromkeys([c.question, *QUESTIONS[:2]]):
        got = pc.generate(small, question, config=cfg)
        assert got.stats.encoding == str(small.path)
        assert_same(got, pc.generate(copy, question, config=cfg))
        fresh = pc.generate(c.context, question, config=cfg)
        assert got.stats.chunk_spans == fresh.stats.chunk_spans
        assert got.stats.chunk_nll_all == pytest.approx(fresh.stats.chunk_nll_all, rel=2e-2, abs=2e-2)


def _int8_claims_exact(d):
    meta = json.loads((d / "meta.json").read_text())
    meta["settings"]["kv_store"] = "exact"
    (d / "meta.json").write_text(json.dumps(meta))


def _unknown_store(d):
    meta = json.loads((d / "meta.json").read_text())
    meta["settings"]["kv_store"] = "int4"
    (d / "meta.json").write_text(json.dumps(meta))


def _flip_bytes(d):
    f = d / "chunk_00001.safetensors"
    data = bytearray(f.read_bytes())
    for i in range(len(data) - 1000, len(data) - 1):  # in the K/V payload, past the header
        data[i] ^= 0x5A
    f.write_bytes(bytes(data))


# id, what is done to a saved int8 encoding, when it is refused ("load" or "answer"), words of the refusal
DAMAGED = [
    ("claims_exact", _int8_claims_exact, "load", ["chunk_00000", "does not hold the tensors"]),
    ("unknown_store", _unknown_store, "load", ["int4", "exact, int8"]),
    ("flipped_bytes", _flip_bytes, "answer", ["chunk_00001", "checksum mismatch"]),
]


@pytest.mark.parametrize("damage,when,words", [pytest.param(*row, id=i) for i, *row in DAMAGED])
def test_a_damaged_int8_encoding_is_refused(pc, tmp_path_factory, tmp_path, damage, when, words):
    c = case("no_budget_k3_b1")
    saved = tmp_path_factory.mktemp("int8") / "enc"
    pc.encode(c.context, int8_config(c.config), path=saved)
    copy = tmp_path / "enc"
    shutil.copytree(saved, copy)
    damage(copy)
    if when == "load":
        raises_one_line(lambda: pc.load_encoded(copy), *words)
    else:
        encoded = pc.load_encoded(copy)
        raises_one_line(lambda: pc.generate(encoded, c.question, config=c.config), *words)


def test_a_bad_kv_store_setting_is_one_line():
    raises_one_line(lambda: ParallelCompConfig(kv_store="fp4").check(), "kv_store", "fp4", "exact, int8")


def test_stored_ids_change_with_int8_only(pc):
    """The server's document ids: the same for an exact store as before the setting existed, others for int8."""
    cfg = ParallelCompConfig()
    exact = json.loads(store_fingerprint(pc, cfg))
    assert "kv_store" not in exact["settings"]
    small = json.loads(store_fingerprint(pc, int8_config(cfg)))
    assert small["settings"].pop("kv_store") == "int8" and small == exact


def test_cli_saves_and_answers_from_an_int8_encoding(model_dir, tmp_path, capsys):
    c = case("budget_chat_k2_b3")
    doc = tmp_path / "doc.txt"
    doc.write_text(c.context)
    model = ["--model", str(model_dir), "--dtype", "float32"]
    enc = tmp_path / "enc"
    assert main([*model, "--input", str(doc), "--question", QUESTIONS[0], "--save-encoding", str(enc),
                 "--kv-store", "int8", "--json", *cli_args(c.config)]) == 0
    saved = json.loads(capsys.readouterr().out)
    meta = json.loads((enc / "meta.json").read_text())
    assert meta["settings"]["kv_store"] == "int8"
    assert main([*model, "--encoding", str(enc), "--question", QUESTIONS[0], "--json",
                 *cli_args(c.config, only=("max_new_tokens", "keep_chunks", "kv_budget"))]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["token_ids"] == saved["token_ids"] and again["stats"]["kept_chunks"] == saved["stats"]["kept_chunks"]
    assert main([*model, "--input", str(doc), "--question", "q", "--kv-store", "int4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int4" in err[0]
