"""parallelcomp-triton: ParallelComp long-context inference for Llama, Mistral and Qwen models, with Triton kernels."""
from .config import Calibration, ParallelCompConfig
from .errors import ParallelCompError
from .pipeline import GenerationResult, ParallelComp

__all__ = ["ParallelComp", "ParallelCompConfig", "Calibration", "GenerationResult", "ParallelCompError"]
__version__ = "0.1.0"
