"""Attention pictures: the PNG, the recorded scores, the shape names, the CLI's errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

from parallelcomp_triton import Calibration, ParallelCompConfig
from parallelcomp_triton import inspect_attention as pic
from parallelcomp_triton.errors import ParallelCompError

pytest.importorskip("matplotlib")

DOC = ("The grass is green. The sky is blue. " * 24 + "The pass key is 4242. Remember it. "
       + "Here we go. There and back again. " * 24)


@pytest.fixture(scope="module")
def pc():
    from _tiny_pipeline import tiny_pc

    return tiny_pc(layers=4)


def test_png_of_the_expected_size_and_what_it_summarises(pc, tmp_path):
    out = tmp_path / "attn.png"
    cfg = ParallelCompConfig(chunk_tokens=250, kv_budget=40, keep_chunks=2, max_new_tokens=2)
    picture = pic.render_attention(pc, DOC, "What is the pass key?", str(out), config=cfg,
                                   bands=[(0, 1), (2, 3)], figsize=(8, 5), dpi=50)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert pic.png_size(str(out)) == (400, 250) == (picture.width_px, picture.height_px)
    assert [b["layers"] for b in picture.bands] == [[0, 1], [2, 3]]
    res = picture.result
    assert len(res.stats.chunk_spans) == -(-len(pc.tokenizer.encode(DOC)) // 250)
    assert len(res.stats.kept_chunks) == 2
    # The KV-kept marks are the union over KV heads of what the pipeline itself reports keeping.
    for band in picture.bands:
        first = band["layers"][0]
        expected = sum(len(np.unique(res.kept_positions[c][first].numpy())) for c in res.stats.kept_chunks)
        assert band["kept_tokens_first_layer"] == expected
        assert band["shape"] in ("U-shape", "mountain", "uniform", "sink (start-heavy)", "recency (end-heavy)",
                                 "mixed")


def test_recorder_keeps_every_chunk_and_layer_and_scores_are_shares(pc):
    rec = pic.AttentionRecorder()
    cfg = ParallelCompConfig(chunk_tokens=300, kv_budget=None, gqa_reduce="mean", max_new_tokens=1,
                             calibration=Calibration(region="all", first_layer=1, last_layer=2, tau=0.01))
    res = pc.generate(DOC, "What is the pass key?", config=cfg, observer=rec)
    spans = res.stats.chunk_spans
    assert set(rec.mass) == {(layer, c) for layer in range(4) for c in range(len(spans))}
    rows = res.stats.score_rows  # the question's last w tokens and the chat turn's end after them
    for (layer, c), mass in rec.mass.items():
        assert mass.shape == (spans[c][1] - spans[c][0],) and np.isfinite(mass).all()
        # Mean over query heads of probabilities: each of the w rows gives the context at most 1.
        assert 0 < mass.sum() / rows <= 1 + 1e-5
    assert rec.kept == {}  # no KV eviction: nothing to mark
    assert sorted(rec.calibration_masks) == [1, 2] and any(m.any() for m in rec.calibration_masks.values())


def test_calibration_drops_map_merged_entries_back_to_document_tokens():
    rec = pic.AttentionRecorder()
    layer, prefix = 5, 2
    spans = [(0, 10), (10, 20), (20, 30)]
    rec.kept[(layer, 0)] = np.array([[1, 3, 5, 7], [0, 2, 4, 6]])
    rec.kept[(layer, 2)] = np.array([[0, 1, 2, 3], [6, 7, 8, 9]])
    mask = np.zeros((prefix + 8 + 3, 4), dtype=bool)  # prefix, chunks 0 and 2 (4 each), 3 question rows
    mask[0, 1] = True                     # a prefix entry
    mask[prefix + 1, 0] = True            # chunk 0, entry 1, query head 0 -> KV head 0 -> position 3
    mask[prefix + 1, 3] = True            # same entry, query head 3 -> KV head 1 -> position 2
    mask[prefix + 4 + 3, 2] = True        # chunk 2, entry 3, KV head 1 -> 9 -> document token 29
    mask[prefix + 8 + 1, 0] = True        # a question row: not a document token
    rec.calibration_masks[layer] = mask
    positions, prefix_hits = pic.calibration_drops(rec, layer, spans, [0, 2], prefix, 4, budget=4)
    assert positions.tolist() == [2, 3, 29] and prefix_hits == 1
    # Without KV eviction the chunks hold all their tokens: entry i of a chunk is its token i.
    rec.kept.clear()
    mask = np.zeros((prefix + 20 + 3, 4), dtype=bool)
    mask[prefix + 7, 1] = True            # chunk 0, token 7
    mask[prefix + 12, 0] = True           # chunk 2 (entries 10-19), token 2 -> document token 22
    mask[prefix + 21, 0] = True           # a question row
    rec.calibration_masks[layer] = mask
    positions, prefix_hits = pic.calibration_drops(rec, layer, spans, [0, 2], prefix, 4, budget=None)
    assert positions.tolist() == [7, 22] and prefix_hits == 0


@pytest.mark.parametrize("profile,shape", [
    (np.r_[[6.0, 3.0], np.full(16, 0.5), [3.0, 4.0]], "U-shape"),
    (np.r_[np.full(5, 0.3), np.full(10, 1.8), np.full(5, 0.3)], "mountain"),
    (1 + 0.2 * np.sin(np.arange(20)), "uniform"),
    (np.r_[[9.0, 4.0], np.full(18, 0.6)], "sink (start-heavy)"),
    (np.r_[np.full(18, 0.6), [2.0, 5.0]], "recency (end-heavy)"),
])
def test_shape_names(profile, shape):
    assert pic.classify_shape(profile)["shape"] == shape


def test_profile_is_relative_to_the_chunk_mean():
    assert np.allclose(pic.chunk_profile(np.full(1000, 0.003)), 1.0)
    ramp = pic.chunk_profile(np.arange(1, 101, dtype=np.float32))
    assert len(ramp) == pic.PROFILE_BINS and ramp.mean() == pytest.approx(1.0) and np.all(np.diff(ramp) > 0)
    assert len(pic.chunk_profile(np.array([1.0, 3.0, 2.0]))) == pic.PROFILE_BINS  # shorter than the bins


def test_bands():
    assert pic.default_bands(30) == [(0, 7), (8, 15), (16, 23), (24, 29)]
    assert pic.default_bands(3) == [(0, 0), (1, 1), (2, 2)]
    assert pic.parse_bands("0-7, 8-15,20") == [(0, 7), (8, 15), (20, 20)]
    with pytest.raises(ParallelCompError, match="has 30 layers"):
        pic.check_bands([(24, 30)], 30)


@pytest.mark.parametrize("spec", ["0-7,,8", "7-3", "a-b", ""])
def test_bad_bands(spec):
    with pytest.raises(ParallelCompError, match="--bands"):
        pic.parse_bands(spec)


def _one_error_line(stderr):
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    return path


@pytest.mark.parametrize("make_args,expect", [
    (lambda d, t: ["--input", str(t / "missing.txt"), "--question", "q", "--out", str(t / "a.png")], "no such file"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--out", str(t / "no" / "a.png")], "does not exist"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--out", str(t / "a.gif")], ".png"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--out", str(t / "a.png"), "--bands", "3-1"], "--bands"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--out", str(t / "a.png"), "--kv-budget", "0"],
     "kv_budget"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--out", str(t / "a.png"), "--calibrate", "x"],
     "calibrate"),
    (lambda d, t: ["--input", str(d), "--out", str(t / "a.png")], "--question"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--out", str(t / "a.png"), "--dpi", "5"], "--dpi"),
    (lambda d, t: ["--input", str(d), "--question", "q", "--out", str(t)], ".png"),
])
def test_cli_bad_input_one_line_exit_2(doc, tmp_path, capsys, make_args, expect):
    assert pic.main(make_args(doc, tmp_path)) == 2
    assert expect in _one_error_line(capsys.readouterr().err)


def test_cli_without_matplotlib_one_line_exit_2(doc, tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    assert pic.main(["--input", str(doc), "--question", "q", "--out", str(tmp_path / "a.png")]) == 2
    assert "matplotlib is not installed" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "a.png").exists()


def test_cli_with_tiny_model(doc, tmp_path, capsys, monkeypatch):
    from _tiny_pipeline import tiny_pc

    from parallelcomp_triton.pipeline import ParallelComp

    monkeypatch.setattr(ParallelComp, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_pc(layers=2)))
    out = tmp_path / "a.png"
    assert pic.main(["--input", str(doc), "--question", "What is the pass key?", "--out", str(out),
                     "--chunk-tokens", "400", "--kv-budget", "50", "--max-new-tokens", "1", "--dpi", "40",
                     "--calibrate", "all:0-1:0.02", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert pic.png_size(str(out)) == (560, round((2 * 2.6 + 0.9) * 40))
    assert "layer 0:" in printed and "layer 1:" in printed and "calibration masks" in printed


@pytest.mark.slow
def test_cli_on_bundled_model(bundled_model_dir, essays_dir, tmp_path):
    text = open(os.path.join(essays_dir, "bias.txt"), encoding="utf-8").read()  # ~750 tokens: 3 chunks
    doc = tmp_path / "essay.txt"
    doc.write_text(text)
    out = tmp_path / "attn.png"
    proc = subprocess.run([sys.executable, "-m", "parallelcomp_triton.inspect_attention", "--input", str(doc),
                           "--question", "What is the essay about?", "--out", str(out), "--chunk-tokens", "256",
                           "--kv-budget", "64", "--bands", "0-14,15-29", "--max-new-tokens", "2", "--no-progress"],
                          capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="0"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert pic.png_size(str(out)) == (1400, round((2 * 2.6 + 0.9) * 100))
    assert "layers 0-14:" in proc.stdout and "layers 15-29:" in proc.stdout
