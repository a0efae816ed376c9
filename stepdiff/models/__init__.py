"""Small networks for the book: an MLP for 2-D toys and attention layers for images."""

from .attention import Attention
from .mlp import MLP, MLPConfig

__all__ = ["Attention", "MLP", "MLPConfig"]
