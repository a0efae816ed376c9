"""Custom kernels for the hot paths, each beside its PyTorch reference and its dispatcher.

Importing this package never imports Triton or touches a GPU driver: the Triton kernels
are compiled on first use, on CUDA tensors (or in the interpreter when asked).
"""

from .attention import attention
from .fused import affine_step, noise_add

__all__ = ["affine_step", "attention", "noise_add"]
