"""Ahead-of-time resource report: compile every kernel for A100 (sm_80) and H100 (sm_90a) without a GPU
and print one JSON object per line with its registers, spill bytes and shared memory.

    python -m parallelcomp_triton.kernels.report [--targets 80,90] [--dtypes bf16] [--head-dims 64,128]
    python -m parallelcomp_triton.kernels.report --tuned     # what the tuning tables choose, per GPU

--tuned prints one JSON object per entry of every kernels/tuned/<arch>.json (benchmarks/tune_gpu.py): the
shape class, the tiles the launch wrapper takes for it, the path the dispatch takes ("triton", or "sdpa"
where the tuned kernel still lost to torch's SDPA on that card) and both timings.

Each kernel module exposes `aot_specs(dtype, head_dim) -> list[dict]` with keys kernel, fn (the
@triton.jit function), signature, constexprs, num_warps, num_stages and optionally attrs (ASTSource's
{(arg_index,): [["tt.divisibility", 16]]} for the pointers and strides Triton's JIT would mark aligned;
`aligned_attrs` builds it). Registers and spills come from the bundled `ptxas -v` run on the generated
PTX with Triton's own flags; shared memory from the compiled kernel's metadata (Triton allocates it
dynamically, ptxas does not see it). A module that is missing or has no aot_specs is skipped with a
note on stderr; a kernel that fails to compile gives a row with an "error" field and exit status 1.

Compiling needs real @triton.jit functions: under TRITON_INTERPRET=1 the kernels are interpreter
objects, so `compile_report` then reruns this module in a subprocess without that variable.
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

from parallelcomp_triton.kernels.dispatch import triton_interpret_enabled

FAMILIES = ("select_kv", "decode_attention", "chunk_attention")
DEFAULT_TARGETS = (80, 90)
DEFAULT_DTYPES = ("bf16",)
DEFAULT_HEAD_DIMS = (64, 128)
# Largest dynamic shared memory a block may opt into.
SHARED_LIMIT_BYTES = {80: 166912, 90: 232448}

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
}


def aligned_attrs(kernel, arg_names) -> dict:
    """ASTSource attrs marking `arg_names` 16-aligned (pointers) / multiples of 16 (ints), as Triton's
    JIT specialises the arguments of a real launch; without them loads are not vectorised."""
    return {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in arg_names}


def _family_specs(family: str, dtype: str, head_dim: int) -> list[dict] | None:
    """The family's specs, or None (noted on stderr) when the module or its aot_specs does not exist."""
    name = f"parallelcomp_triton.kernels.{family}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        print(f"report: skipping {family}: no module {name}", file=sys.stderr)
        return None
    if not hasattr(module, "aot_specs"):
        print(f"report: skipping {family}: {name} has no aot_specs", file=sys.stderr)
        return None
    return module.aot_specs(dtype, head_dim)


def _ptxas_usage(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", ptx_path, "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    usage = {}
    for field, pattern in _PTXAS_RE.items():
        match = pattern.search(log)
        if match is None:
            raise RuntimeError(f"report: no '{field}' in ptxas output:\n{log}")
        usage[field] = int(match.group(1))
    return usage


def _compile_one(family: str, spec: dict, arch: int, dtype: str, head_dim: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    source = triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                                       attrs=spec.get("attrs"))
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    usage = _ptxas_usage(compiled.asm["ptx"], arch)
    return {
        "kernel": spec["kernel"],
        "family": family,
        "target": f"sm_{arch}",
        "dtype": dtype,
        "head_dim": head_dim,
        "registers": usage["registers"],
        "spill_bytes": usage["spill_store_bytes"] + usage["spill_load_bytes"],
        "shared_bytes": compiled.metadata.shared,
        "shared_limit_bytes": SHARED_LIMIT_BYTES.get(arch),
        "stack_bytes": usage["stack_bytes"],
        "num_warps": spec["num_warps"],
        "num_stages": spec["num_stages"],
    }


def _error_row(kernel, family, target, dtype, head_dim, exc) -> dict:
    message = f"{type(exc).__name__}: {exc}"
    print(f"report: {kernel} {target} {dtype} d={head_dim} failed: {message}", file=sys.stderr)
    return {"kernel": kernel, "family": family, "target": target, "dtype": dtype, "head_dim": head_dim,
            "error": message.splitlines()[0]}


def _report_rows(targets, dtypes, head_dims, families):
    # One broken kernel must not hide the others' numbers: failures become rows with an "error".
    for dtype in dtypes:
        for head_dim in head_dims:
            for family in families:
                try:
                    specs = _family_specs(family, dtype, head_dim)
                except Exception as exc:
                    yield _error_row(f"{family}.aot_specs", family, None, dtype, head_dim, exc)
                    continue
                for spec in specs or ():
                    for arch in targets:
                        try:
                            yield _compile_one(family, spec, arch, dtype, head_dim)
                        except Exception as exc:
                            yield _error_row(spec["kernel"], family, f"sm_{arch}", dtype, head_dim, exc)


def compile_report(targets=DEFAULT_TARGETS, dtypes=DEFAULT_DTYPES, head_dims=DEFAULT_HEAD_DIMS,
                   families=FAMILIES) -> list[dict]:
    """Compile every kernel for each CUDA compute capability in `targets` (80, 90, ...), dtype and head dim.

    Returns one dict per (kernel, target, dtype, head_dim), as the CLI prints them; a kernel that fails
    to compile gives a row with an "error" field instead of the resource fields."""
    if not triton_interpret_enabled():
        return list(_report_rows(targets, dtypes, head_dims, families))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--targets", ",".join(map(str, targets)), "--dtypes", ",".join(dtypes),
            "--head-dims", ",".join(map(str, head_dims)), "--families", ",".join(families)]
    proc = subprocess.run([sys.executable, "-m", "parallelcomp_triton.kernels.report", *args],
                          env=env, capture_output=True, text=True)
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, 1) or not rows:
        raise RuntimeError(f"report subprocess failed ({proc.returncode}):\n{proc.stderr}")
    return rows


def tuned_rows(directory=None) -> list[dict]:
    """One row per tuning-table entry, every GPU architecture that has a table."""
    from pathlib import Path

    from parallelcomp_triton.kernels.tuning import TUNED_DIR, load_table

    rows = []
    for path in sorted(Path(directory or TUNED_DIR).glob("sm_*.json")):
        for entry in load_table(path.stem, str(path.parent)):
            row = {"arch": path.stem, **{k: v for k, v in entry.items() if k not in ("config",)},
                   "config": entry.get("config")}
            if entry.get("use") == "sdpa":
                row["note"] = "dispatch takes torch SDPA for this shape class: the tuned Triton kernel was slower"
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallelcomp_triton.kernels.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)),
                        help="CUDA compute capabilities, comma-separated (default: 80,90)")
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help="bf16, fp16, fp32 (default: bf16)")
    parser.add_argument("--head-dims", default=",".join(map(str, DEFAULT_HEAD_DIMS)), help="default: 64,128")
    parser.add_argument("--families", default=",".join(FAMILIES), help="kernel modules (default: all)")
    parser.add_argument("--tuned", action="store_true",
                        help="print the tuning tables' choices (kernels/tuned/*.json) instead of compiling")
    args = parser.parse_args(argv)
    if args.tuned:
        rows = tuned_rows()
        if not rows:
            print("report: no tuning table (kernels/tuned/sm_XX.json): every GPU uses the wrappers' default tiles "
                  "and the Triton kernels; run benchmarks/tune_gpu.py on a GPU to make one", file=sys.stderr)
        for row in rows:
            print(json.dumps(row), flush=True)
        return 0
    targets = [int(t) for t in args.targets.split(",")]
    dtypes = args.dtypes.split(",")
    head_dims = [int(d) for d in args.head_dims.split(",")]
    families = args.families.split(",")
    if triton_interpret_enabled():
        rows = compile_report(targets, dtypes, head_dims, families)
    else:
        rows = _report_rows(targets, dtypes, head_dims, families)
    failed = False
    for row in rows:
        failed = failed or "error" in row
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
