"""kernels.report: every kernel compiles ahead of time for sm_80 and sm_90 without spills and within
the target's shared memory. Runs the CLI in a subprocess, with TRITON_INTERPRET=1 still set as under
pytest, so the report's own re-launch without the interpreter is exercised too."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448}  # A100 163 KB, H100 227 KB
FIELDS = {"kernel", "family", "target", "dtype", "head_dim", "registers", "spill_bytes", "shared_bytes"}


def _expected_families():
    families = {"select_kv", "decode_attention"}
    if importlib.util.find_spec("parallelcomp_triton.kernels.chunk_attention") is not None:
        families.add("chunk_attention")
    return families


@pytest.fixture(scope="module")
def report_rows():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "parallelcomp_triton.kernels.report"], env=env,
                          capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [row for row in rows if "error" in row]
    assert proc.returncode == 0 and not failed, f"report failed ({proc.returncode}): {failed}\n{proc.stderr[-3000:]}"
    return rows


@pytest.mark.slow
def test_report_covers_every_kernel_family(report_rows):
    assert {row["family"] for row in report_rows} == _expected_families()
    for row in report_rows:
        assert FIELDS <= row.keys(), row
    # Every kernel specialisation for both targets, every family for both head dims.
    targets = {}
    for row in report_rows:
        targets.setdefault((row["kernel"], row["head_dim"], row["dtype"]), set()).add(row["target"])
    assert all(seen == set(SHARED_LIMIT) for seen in targets.values()), targets
    for family in _expected_families():
        assert {row["head_dim"] for row in report_rows if row["family"] == family} == {64, 128}, family
    kernels = {row["kernel"] for row in report_rows}
    assert {"select_kv", "gather_kv", "decode_attention_combine"} <= kernels
    assert any(k.startswith("decode_attention_split") for k in kernels)


@pytest.mark.slow
def test_report_no_spills_and_shared_memory_fits(report_rows):
    for row in report_rows:
        assert row["spill_bytes"] == 0, row
        assert 0 < row["registers"] <= 255, row
        assert 0 <= row["shared_bytes"] <= SHARED_LIMIT[row["target"]], row
