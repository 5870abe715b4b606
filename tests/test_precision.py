"""dtype "auto": bf16 where the hardware computes it natively, float32 elsewhere; explicit dtypes win."""
import json
import os
import subprocess
import sys

import pytest
import torch

from parallelcomp_triton import precision
from parallelcomp_triton.errors import ParallelCompError
from parallelcomp_triton.pipeline import ParallelComp


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
        assert res.stats["dtype"] == str(dtype).removeprefix("torch.")
        assert res.stats["dtype_source"].startswith("auto")
    pc = ParallelComp.from_pretrained(model_dir, dtype="float32")
    res = pc.generate("The pass key is 12. " * 3, "What is it?", max_new_tokens=2)
    assert (res.stats["dtype"], res.stats["dtype_source"]) == ("float32", "explicit")


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
