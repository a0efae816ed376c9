"""Custom kernels for the hot paths, each beside its PyTorch reference and its dispatcher.

Importing this package never imports Triton or touches a GPU driver: the Triton kernels
are compiled on first use, on CUDA tensors (or in the interpreter when asked).
"""

from .attention import attention
from .fused import affine_step, noise_add
from .norm import adaln_modulate, group_norm_silu

__all__ = ["adaln_modulate", "affine_step", "attention", "group_norm_silu", "noise_add"]
