from setuptools import setup

setup(
    name="parallelcomp-triton",
    version="0.1.0",
    description="ParallelComp long-context compression for Llama, Mistral and Qwen models, with hand-written Triton kernels",
    packages=["parallelcomp_triton", "parallelcomp_triton.kernels"],
    # The kernels live in ./kernels but are installed as parallelcomp_triton.kernels:
    # a top-level module named `kernels` would clash with another PyPI package.
    package_dir={"parallelcomp_triton": "parallelcomp_triton", "parallelcomp_triton.kernels": "kernels"},
    # Tile configs measured per GPU architecture by benchmarks/tune_gpu.py (kernels/tuning.py reads them).
    package_data={"parallelcomp_triton.kernels": ["tuned/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "transformers>=4.45",
        "safetensors",
        "tokenizers",
        "numpy",
        "gguf",
        "tqdm",
    ],
    extras_require={"plot": ["matplotlib"], "eval": ["rouge-score", "rapidfuzz"], "test": ["pytest"],
                    # python -m parallelcomp_triton.serve (python-multipart: document uploads; openai: its tests)
                    "serve": ["fastapi", "uvicorn", "python-multipart", "openai"]},
)
