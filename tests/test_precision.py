"""dtype "auto": bf16 where the hardware computes it natively, float32 elsewhere; explicit dtypes win."""
import json
import os
import subprocess
import sys

import pytest
import torch

from parallelcomp_triton import ParallelComp, precision
from parallelcomp_triton.errors import ParallelCompError


@pytest.fixture
def cpu_features(monkeypatch):
    def set_features(*features):
        monkeypatch.setattr(precision, "cpu_bf16_features", lambda: tuple(features))
    return set_features


@pytest.mark.parametrize("features,expected", [(("avx512_bf16",), torch.bfloat16), (("amx_bf16",), torch.bfloat16),
                                               ((), torch.float32)])
def test_auto_follows_the_cpu(cpu_features, features, expected):
    cpu_features(*features)
    for spelling in ("auto", "AUTO", None):
        dtype, why = precision.resolve_dtype(spelling, "cpu")
        assert dtype == expected and why.startswith("auto")
        assert all(f in why for f in features)


@pytest.mark.parametrize("spelling,expected", [("float32", torch.float32), ("bf16", torch.bfloat16),
                                               ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_explicit_dtype_overrides_auto(cpu_features, spelling, expected):
    cpu_features("avx512_bf16")
    assert precision.resolve_dtype(spelling, "cpu") == (expected, "explicit")


def test_bad_dtype_is_one_error():
    with pytest.raises(ParallelCompError, match="dtype"):
        precision.resolve_dtype("float8", "cpu")


def test_cpu_features_agree_with_proc_cpuinfo():
    """The torch probe and the kernel's flags must tell the same story (Linux)."""
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    flags = precision._proc_cpuinfo_flags()
    precision.cpu_bf16_features.cache_clear()
    found = precision.cpu_bf16_features()
    assert ("avx512_bf16" in found) == ("avx512_bf16" in flags)


def test_from_pretrained_default_is_auto_and_reported(model_dir, cpu_features):
    for features, dtype in ((("avx512_bf16",), torch.bfloat16), ((), torch.float32)):
        cpu_features(*features)
        pc = ParallelComp.from_pretrained(model_dir)
        assert pc.model.embed_tokens.weight.dtype == dtype
        res = pc.generate("The pass key is 12. " * 3, "What is it?", max_new_tokens=2)
        assert res.stats.dtype == str(dtype).removeprefix("torch.")
        assert res.stats.dtype_source.startswith("auto")
    pc = ParallelComp.from_pretrained(model_dir, dtype="float32")
    res = pc.generate("The pass key is 12. " * 3, "What is it?", max_new_tokens=2)
    assert (res.stats.dtype, res.stats.dtype_source) == ("float32", "explicit")


def test_cli_json_reports_the_dtype(model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 12. " * 3)
    env = dict(os.environ, TRITON_INTERPRET="0")
    for flag, expected in (([], None), (["--dtype", "float32"], "float32")):
        proc = subprocess.run([sys.executable, "-m", "parallelcomp_triton.run", "--model", str(model_dir), "--input",
                               str(doc), "--question", "q", "--max-new-tokens", "2", "--json", "--no-progress", *flag],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        stats = json.loads(proc.stdout)["stats"]
        if expected is None:
            expected = "bfloat16" if precision.cpu_bf16_features() else "float32"
        assert stats["dtype"] == expected


@torch.no_grad()
def test_decode_sized_bf16_calls_run_aten_gemv_and_restore_onednn():
    """bf16 calls of one or two rows on the CPU run their linear layers with oneDNN off (ATen's GEMV, about
    twice as fast there), larger calls with it on; the flag is restored after, also when the call raises;
    a row's logits alone equal its logits inside a larger batch within bf16 rounding."""
    from _tiny_pipeline import tiny_pc

    model = tiny_pc(dtype=torch.bfloat16).model
    seen = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, args: seen.append((args[0].shape[0],
                                                                          torch._C._get_mkldnn_enabled())))
    attend = model.causal_attend
    ids = torch.tensor([5, 9, 13, 2, 7])
    for n in (1, 2, 5):
        seen.clear()
        hidden = model(ids[:n], torch.arange(n), attend(torch.tensor([0, n], dtype=torch.int32)))
        logits = model.lm_head_rows(hidden[-1:] if n < 5 else hidden)
        assert seen and all(enabled == (n > 2 or rows > 2) for rows, enabled in seen), (n, seen)
        assert torch._C._get_mkldnn_enabled()
    batch_row = model.lm_head_rows(model(ids, torch.arange(5), attend(torch.tensor([0, 5], dtype=torch.int32))))[:1]
    alone = model.lm_head_rows(model(ids[:1], torch.arange(1), attend(torch.tensor([0, 1], dtype=torch.int32))))
    torch.testing.assert_close(alone, batch_row, atol=0.05 * batch_row.abs().max().item(), rtol=0)

    def broken(*_):
        raise RuntimeError("attend failed")

    with pytest.raises(RuntimeError, match="attend failed"):
        model(ids[:1], torch.arange(1), broken)
    assert torch._C._get_mkldnn_enabled()
