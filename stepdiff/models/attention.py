r"""Multi-head attention as UNet and DiT blocks use it: self-attention over image tokens, or
cross-attention from image tokens to a context (text tokens).

For tokens $x \in \R^{L\times d}$ and a context $y \in \R^{L_c\times d_c}$ ($y = x$ for
self-attention), with $h$ heads of dimension $D$:

$$Q = xW_q,\quad K = yW_k,\quad V = yW_v \quad (\text{each split into } h \text{ heads}),\qquad
\mathrm{out} = \big[\mathrm{softmax}(Q_iK_i^\top/\sqrt{D})\,V_i\big]_{i=1}^h\,W_o + b_o.$$

The attention itself is `stepdiff.kernels.attention`: the Triton flash-attention kernels on a
GPU, the PyTorch reference on a CPU; or, with ``backend="sdpa"``, PyTorch's
``F.scaled_dot_product_attention`` (what a plain PyTorch model would call: the baselines of the
end-to-end benchmark).

A context of several lengths is padded on the right to one length $L_c$ and comes with a mask
(``True`` for a real token). The mask becomes per-row lengths $n_b$ (`context_lengths`), and the
kernel ignores keys $j \ge n_b$ of row $b$: the softmax runs over the real tokens only, so the
padding tokens, whatever their values, change nothing.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.attention import attention
from .layers import check_backend

__all__ = ["Attention", "context_lengths"]


# Masks already turned into lengths, by id: (a weak reference to the mask, its version counter,
# the lengths). A model hands the same mask to every cross-attention layer; checking it reads its
# values (a device synchronisation on a GPU), so it is done once per mask, and the layers share one
# lengths tensor, which the kernel then checks once too. Any in-place write to the mask moves its
# version counter and so invalidates the entry.
_LENGTHS: dict[int, tuple] = {}


def context_lengths(context_mask: Tensor, batch: int, length: int) -> Tensor:
    r"""The number of real tokens $n_b$ of each row of a right-padding mask, as a ``LongTensor [B]``.

    ``context_mask`` must be a bool tensor ``[batch, length]`` whose rows are a run of ``True``
    followed by ``False`` (padding on the right), with at least one ``True`` per row; anything else
    is an error naming ``context_mask`` and the first offending row. The same mask (unchanged)
    gives back the same lengths tensor without a second check.
    """
    if not isinstance(context_mask, Tensor) or context_mask.dtype != torch.bool:
        desc = context_mask.dtype if isinstance(context_mask, Tensor) else type(context_mask).__name__
        raise TypeError(f"context_mask must be a bool tensor (True for a real token); got {desc}")
    if context_mask.shape != (batch, length):
        raise ValueError(
            f"context_mask must have shape [{batch}, {length}] (batch, context length); got {tuple(context_mask.shape)}"
        )
    # Tensors made under torch.inference_mode have no version counter: they are checked every time.
    cached = not context_mask.is_inference()
    entry = _LENGTHS.get(id(context_mask)) if cached else None
    if entry is not None and entry[0]() is context_mask and entry[1] == context_mask._version:
        return entry[2]
    # A plain tensor even under inference_mode, so that the kernel can remember it checked it
    # (an inference tensor has no version counter).
    with torch.inference_mode(False):
        lengths = context_mask.sum(1)
    if not (context_mask.is_cuda and torch.cuda.is_current_stream_capturing()):  # values unreadable in capture
        prefix = torch.arange(length, device=context_mask.device)[None, :] < lengths[:, None]
        bad = (prefix != context_mask).any(1) | (lengths == 0)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            what = "has no True (no real token)" if int(lengths[row]) == 0 else "is not a run of True then False"
            raise ValueError(
                f"context_mask must pad on the right (each row: True for the real tokens, then False); "
                f"row {row} {what}: {context_mask[row].int().tolist()}"
            )
    if cached:
        if len(_LENGTHS) > 64:  # drop the entries of masks that are gone
            for key in [key for key, e in _LENGTHS.items() if e[0]() is None]:
                del _LENGTHS[key]
        _LENGTHS[id(context_mask)] = (weakref.ref(context_mask), context_mask._version, lengths)
    return lengths


class Attention(nn.Module):
    r"""Multi-head self- or cross-attention with query/key/value/output projections.

    - ``dim``: width $d$ of the tokens ``x [B, L, dim]``; the output has the same shape.
    - ``heads``, ``head_dim``: $h$ and $D$ (default ``dim // heads``); the inner width $hD$ need
      not equal ``dim`` (Stable Diffusion 1.x: 8 heads of 40, 80 or 160; DiT-XL: 16 of 72).
    - ``context_dim``: width $d_c$ of the context for cross-attention (default ``dim``).
    - ``qkv_bias``: biases on the $Q, K, V$ projections (the output projection always has one).
    - ``causal``: token $i$ attends to tokens $j \le i$ only (self-attention over sequences).
    - ``backend``: passed to `stepdiff.kernels.attention` (``None``: dispatch on the device), or
      ``"sdpa"``: PyTorch's ``F.scaled_dot_product_attention`` with the same masks.
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: int | None = None,
                 context_dim: int | None = None, qkv_bias: bool = False, causal: bool = False,
                 backend: str | None = None):
        super().__init__()
        check_backend("backend", backend, attention=True)
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim {dim} is not divisible by heads {heads}; give head_dim")
            head_dim = dim // heads
        self.heads, self.head_dim = heads, head_dim
        self.causal, self.backend = causal, backend
        inner = heads * head_dim
        context_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """``x [B, L, dim]``, ``context [B, Lc, context_dim]`` or ``None`` (self-attention);
        returns ``[B, L, dim]``. ``context_mask [B, Lc]`` (bool, ``True`` for a real token, padding
        on the right; for self-attention it masks the keys of ``x`` itself): keys at padding
        positions are ignored."""
        context = x if context is None else context
        B, L, _ = x.shape
        Lc = context.shape[1]
        kv_lens = None if context_mask is None else context_lengths(context_mask, B, Lc)
        # [B, L, h*D] -> [B, L, h, D] is a view; the kernel reads this layout through its
        # strides ("blhd"), so no transpose is ever copied.
        q = self.to_q(x).view(B, L, self.heads, self.head_dim)
        k = self.to_k(context).view(B, Lc, self.heads, self.head_dim)
        v = self.to_v(context).view(B, Lc, self.heads, self.head_dim)
        if self.backend == "sdpa":
            o = _sdpa(q, k, v, kv_lens, self.causal)
        else:
            o = attention(q, k, v, kv_lens=kv_lens, causal=self.causal, layout="blhd", backend=self.backend)
        return self.to_out(o.reshape(B, L, self.heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, causal={self.causal}"


def _sdpa(q: Tensor, k: Tensor, v: Tensor, kv_lens: Tensor | None, causal: bool) -> Tensor:
    """``F.scaled_dot_product_attention`` on ``[B, L, H, D]`` tensors, keys ``j >= kv_lens[b]``
    masked out; returns ``[B, L, H, D]``."""
    Lq, Lk = q.shape[1], k.shape[1]
    mask = None
    if kv_lens is not None:
        mask = (torch.arange(Lk, device=q.device)[None, :] < kv_lens[:, None])[:, None, None, :]
    if causal and mask is not None:  # SDPA takes a mask or is_causal, not both
        mask = mask & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        causal = False
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=causal)
    return o.transpose(1, 2)
