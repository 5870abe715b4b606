"""Run from the repository root, as a newcomer does: the top-level `kernels/` folder (installed as
parallelcomp_triton.kernels) must not shadow Hugging Face's `kernels` package, which transformers imports
when it loads a tokenizer. `python -m`, `-c` and `-` put the working directory first on sys.path."""
import importlib.metadata
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
OURS = REPO / "kernels" / "__init__.py"


def python(*args, cwd=REPO, stdin=None, timeout=300):
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


def hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_hf_kernels = pytest.mark.skipif(not hf_kernels_installed(), reason="Hugging Face's kernels is not installed")
WHICH = "import kernels; print(kernels.__file__)"


@needs_hf_kernels
@pytest.mark.parametrize("how", ["-c", "-"])
@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_import_kernels_gives_hugging_faces(how, where, tmp_path):
    args, stdin = (("-c", WHICH), None) if how == "-c" else (("-",), WHICH)
    proc = python(*args, cwd=REPO if where == "repo root" else tmp_path, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    found = pathlib.Path(proc.stdout.strip()).resolve()
    assert found != OURS.resolve()
    assert found.parent.name == "kernels" and "site-packages" in found.parts
    # Ours is still the installed package's kernels, in the same process as theirs.
    proc = python("-c", WHICH + "; import parallelcomp_triton.kernels as k; print(k.__file__, k.chunk_attention)",
                  cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert pathlib.Path(proc.stdout.split()[1]).resolve() == OURS.resolve()


# Hugging Face's package made absent inside the child process: PathFinder finds no `kernels` outside the
# repository root, and no distribution metadata names one.
WITHOUT_HF_KERNELS = textwrap.dedent("""
    import importlib.machinery, importlib.metadata, os, sys
    root = os.path.realpath(os.getcwd())
    _find = importlib.machinery.PathFinder.find_spec.__func__
    def find_spec(cls, name, path=None, target=None):
        if name == "kernels" and all(os.path.realpath(p or os.curdir) != root for p in (path or sys.path)):
            return None
        return _find(cls, name, path, target)
    importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
    _version = importlib.metadata.version
    def version(name):
        if name == "kernels":
            raise importlib.metadata.PackageNotFoundError(name)
        return _version(name)
    importlib.metadata.version = version
""")


def test_without_hugging_faces_kernels_the_folder_reads_as_not_installed():
    """Without Hugging Face's package, `import kernels` in the repository root gives what a stray folder
    without code gives anywhere (an empty namespace package: no __file__, nothing of ours in it), and
    transformers, which imports any `kernels` it finds on sys.path without metadata, reads it as not
    installed and imports. Raising ModuleNotFoundError there broke `from transformers import LlamaConfig`
    (seen with transformers 5.17, which does not pull the package in, on a GPU image)."""
    code = WITHOUT_HF_KERNELS + textwrap.dedent("""
        import kernels
        print(kernels.__file__, sorted(k for k in vars(kernels) if not k.startswith("__")))
        try:
            from kernels import get_kernel
        except ImportError:
            print("no get_kernel")
        from transformers.utils.import_utils import is_kernels_available
        from transformers import LlamaConfig
        print(is_kernels_available(), LlamaConfig.__name__)
        import parallelcomp_triton.kernels as ours
        print(ours.chunk_attention.__name__)
    """)
    proc = python("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["None []", "no get_kernel", "False LlamaConfig", "chunk_attention"]


@needs_hf_kernels
@pytest.mark.slow
def test_tokenizer_and_cli_answer_from_repo_root(bundled_model_dir, tmp_path):
    """The newcomer's first run: transformers loads the bundled tokenizer, and the CLI answers, both in a
    process started in the repository root."""
    proc = python("-c", f"from transformers import AutoTokenizer; "
                        f"print(len(AutoTokenizer.from_pretrained({str(bundled_model_dir)!r})('pass key').input_ids))")
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) > 0
    # The document .ci/run asks about. An earlier one ("The pass key is 31337. Remember it. ..." at the very
    # start) left the model a near-tie after "The pass key is": float32 continues " the number 31337", bf16
    # " 31337" or " a sequence of letters" depending on the GEMV kernel's summation order (both as close to
    # float64 per product), which tested the model's luck, not the run from the repository root.
    doc = tmp_path / "doc.txt"
    doc.write_text("Notes from the meeting. The pass key is 73915. Remember it. "
                   + "The grass is green. The sky is blue. " * 60)
    proc = python("-m", "parallelcomp_triton.run", "--input", str(doc), "--question",
                  "What is the pass key?", "--max-new-tokens", "16", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "73915" in proc.stdout


def test_no_other_module_named_kernels():
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path: a kernels.py there shadowed Hugging Face's
    package the same way (the tokenizer failed to load in every e2e run). Only the package folder, with its
    hand-over, may carry the name."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    shadows = sorted(p for p in tracked if pathlib.PurePath(p).name in ("kernels.py", "kernels")
                     or (pathlib.PurePath(p).parent.name == "kernels" and pathlib.PurePath(p).parent.parent != pathlib.PurePath(".")
                         and pathlib.PurePath(p).name == "__init__.py"))
    assert shadows == [], shadows
