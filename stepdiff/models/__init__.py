"""Small networks for the book: an MLP for 2-D toys and attention layers for images."""

from .attention import Attention

__all__ = ["Attention"]
