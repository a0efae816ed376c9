r"""Multi-head attention as UNet and DiT blocks use it: self-attention over image tokens, or
cross-attention from image tokens to a context (text tokens).

For tokens $x \in \R^{L\times d}$ and a context $y \in \R^{L_c\times d_c}$ ($y = x$ for
self-attention), with $h$ heads of dimension $D$:

$$Q = xW_q,\quad K = yW_k,\quad V = yW_v \quad (\text{each split into } h \text{ heads}),\qquad
\mathrm{out} = \big[\mathrm{softmax}(Q_iK_i^\top/\sqrt{D})\,V_i\big]_{i=1}^h\,W_o + b_o.$$

The attention itself is `stepdiff.kernels.attention`: the Triton flash-attention kernels on a
GPU, the PyTorch reference on a CPU.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..kernels.attention import attention

__all__ = ["Attention"]


class Attention(nn.Module):
    r"""Multi-head self- or cross-attention with query/key/value/output projections.

    - ``dim``: width $d$ of the tokens ``x [B, L, dim]``; the output has the same shape.
    - ``heads``, ``head_dim``: $h$ and $D$ (default ``dim // heads``); the inner width $hD$ need
      not equal ``dim`` (Stable Diffusion 1.x: 8 heads of 40, 80 or 160; DiT-XL: 16 of 72).
    - ``context_dim``: width $d_c$ of the context for cross-attention (default ``dim``).
    - ``qkv_bias``: biases on the $Q, K, V$ projections (the output projection always has one).
    - ``causal``: token $i$ attends to tokens $j \le i$ only (self-attention over sequences).
    - ``backend``: passed to `stepdiff.kernels.attention` (``None``: dispatch on the device).
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: int | None = None,
                 context_dim: int | None = None, qkv_bias: bool = False, causal: bool = False,
                 backend: str | None = None):
        super().__init__()
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

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x [B, L, dim]``, ``context [B, Lc, context_dim]`` or ``None`` (self-attention);
        returns ``[B, L, dim]``."""
        context = x if context is None else context
        B, L, _ = x.shape
        Lc = context.shape[1]
        # [B, L, h*D] -> [B, L, h, D] is a view; the kernel reads this layout through its
        # strides ("blhd"), so no transpose is ever copied.
        q = self.to_q(x).view(B, L, self.heads, self.head_dim)
        k = self.to_k(context).view(B, Lc, self.heads, self.head_dim)
        v = self.to_v(context).view(B, Lc, self.heads, self.head_dim)
        o = attention(q, k, v, causal=self.causal, layout="blhd", backend=self.backend)
        return self.to_out(o.reshape(B, L, self.heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, causal={self.causal}"

