"""stepdiff: diffusion models and flow matching, step by step.

The package the book is written around: noise schedules, the forward process, samplers,
exact denoisers, small models, training, toy data, and Triton GPU kernels for the hot paths.
"""

__version__ = "0.1.0"
