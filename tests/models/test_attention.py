"""The attention layer against PyTorch's own multi-head attention and a plain computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stepdiff.models.attention import Attention, context_lengths


def _plain(layer: Attention, x, context=None):
    """The same layer written out: project, split heads, softmax(QK^T / sqrt(D)) V, merge."""
    context = x if context is None else context
    B, L, _ = x.shape
    h, D = layer.heads, layer.head_dim

    def split(t):
        return t.view(B, -1, h, D).transpose(1, 2).double()

    q, k, v = split(layer.to_q(x)), split(layer.to_k(context)), split(layer.to_v(context))
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    if layer.causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    o = torch.softmax(s, -1) @ v
    return layer.to_out(o.transpose(1, 2).reshape(B, L, h * D).to(x.dtype))


def test_self_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    dim, heads = 48, 6
    layer = Attention(dim, heads, qkv_bias=True)
    mha = nn.MultiheadAttention(dim, heads, bias=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([layer.to_q.weight, layer.to_k.weight,
                                            layer.to_v.weight]))
        mha.in_proj_bias.copy_(torch.cat([layer.to_q.bias, layer.to_k.bias, layer.to_v.bias]))
        mha.out_proj.weight.copy_(layer.to_out.weight)
        mha.out_proj.bias.copy_(layer.to_out.bias)
    x = torch.randn(3, 37, dim)
    want, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_cross_attention_matches_torch_multihead_attention():
    """Image tokens attend to 77 text tokens of another width (kdim = vdim = context_dim)."""
    torch.manual_seed(1)
    dim, ctx_dim, heads = 32, 20, 4
    layer = Attention(dim, heads, context_dim=ctx_dim)
    mha = nn.MultiheadAttention(dim, heads, bias=False, kdim=ctx_dim, vdim=ctx_dim,
                                batch_first=True)
    with torch.no_grad():
        mha.q_proj_weight.copy_(layer.to_q.weight)
        mha.k_proj_weight.copy_(layer.to_k.weight)
        mha.v_proj_weight.copy_(layer.to_v.weight)
        mha.out_proj.weight.copy_(layer.to_out.weight)
        layer.to_out.bias.zero_()  # bias=False removes every bias of the torch module
    x, ctx = torch.randn(2, 50, dim), torch.randn(2, 77, ctx_dim)
    want, _ = mha(x, ctx, ctx, need_weights=False)
    out = layer(x, ctx)
    assert out.shape == x.shape
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [None, "sdpa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_inner_width_differs_from_model_width(causal, backend):
    """8 heads of 40 on a width-64 model (inner 320 != 64), as in Stable Diffusion 1.x; also through
    PyTorch's scaled_dot_product_attention (backend 'sdpa')."""
    torch.manual_seed(2)
    layer = Attention(64, heads=8, head_dim=40, causal=causal, backend=backend)
    x = torch.randn(2, 19, 64)
    torch.testing.assert_close(layer(x), _plain(layer, x), rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_triton_kernels():
    """The layer on the Triton path (interpreter on a CPU) against the reference path: same
    output, and the same gradients for the input, the context and every parameter."""
    torch.manual_seed(3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tri = Attention(40, heads=2, head_dim=24, context_dim=12, qkv_bias=True,
                    backend="triton").to(device)
    ref = Attention(40, heads=2, head_dim=24, context_dim=12, qkv_bias=True,
                    backend="torch").to(device)
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(2, 29, 40, device=device)
    ctx = torch.randn(2, 11, 12, device=device)
    outs, grads = [], []
    for layer in (tri, ref):
        xi, ci = x.clone().requires_grad_(), ctx.clone().requires_grad_()
        out = layer(xi, ci)
        (out * torch.linspace(-1, 1, 40, device=device)).square().sum().backward()
        outs.append(out)
        grads.append([xi.grad, ci.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for g_tri, g_ref in zip(grads[0], grads[1], strict=True):
        assert g_tri is not None and g_ref.abs().sum() > 0
        torch.testing.assert_close(g_tri, g_ref, rtol=1e-4, atol=1e-5)


def test_bad_configuration():
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, heads=4)
    with pytest.raises(ValueError, match="backend must be one of"):
        Attention(32, heads=4, backend="flash")


def test_sdpa_backend_with_causal_and_padding():
    """A causal self-attention over a right-padded sequence: SDPA with the combined mask equals the
    reference path."""
    torch.manual_seed(5)
    ref = Attention(24, heads=3, causal=True, backend="torch")
    sdpa = Attention(24, heads=3, causal=True, backend="sdpa")
    sdpa.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 24)
    mask = torch.arange(7)[None, :] < torch.tensor([[7], [4], [1]])
    torch.testing.assert_close(sdpa(x, context_mask=mask), ref(x, context_mask=mask), rtol=1e-5, atol=1e-6)


# --- context_mask: a right-padded context ------------------------------------------------------


def _padded(B, L, dim, lengths, seed=0, fill=1e4):
    """A context [B, L, dim] whose padding positions hold large garbage, and its mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    context = torch.randn(B, L, dim, generator=g)
    context = torch.where(mask[:, :, None], context, fill * torch.randn(B, L, dim, generator=g))
    return context, mask


@pytest.mark.parametrize("backend", ["torch", "triton", "sdpa"])
@pytest.mark.parametrize("self_attention", [False, True], ids=["cross", "self"])
def test_padding_tokens_change_nothing(backend, self_attention):
    """Each row with its context padded to L (padding filled with large garbage) gives the output
    and gradients it gets with only its real tokens: cross-attention (image tokens to text) and
    self-attention over padded text (at the real tokens), on the reference path and the kernels."""
    torch.manual_seed(4)
    dim, ctx_dim, L, lengths = 24, 10, 9, [9, 4, 1]
    B = len(lengths)
    layer = Attention(dim, heads=3, context_dim=None if self_attention else ctx_dim, qkv_bias=True,
                      backend=backend)
    if self_attention:
        x, mask = _padded(B, L, dim, lengths)
        context, queries = x.requires_grad_(), x
        out = layer(x, context_mask=mask)
        weight = torch.randn(out.shape) * mask[:, :, None]  # a loss that reads the real tokens only
    else:
        queries = torch.randn(B, 7, dim, requires_grad=True)
        context, mask = _padded(B, L, ctx_dim, lengths)
        context.requires_grad_()
        out = layer(queries, context, mask)
        weight = torch.randn(out.shape)
    (out * weight).sum().backward()
    batch_grads = [p.grad.clone() for p in layer.parameters()]
    row_grads = [torch.zeros_like(p) for p in layer.parameters()]
    for b, n in enumerate(lengths):
        layer.zero_grad()
        cb = context.detach()[b : b + 1, :n].clone().requires_grad_()
        if self_attention:
            out_b, rows = layer(cb), slice(0, n)
        else:
            qb = queries.detach()[b : b + 1].clone().requires_grad_()
            out_b, rows = layer(qb, cb), slice(None)
        torch.testing.assert_close(out[b : b + 1, rows], out_b, rtol=1e-5, atol=1e-5)
        (out_b * weight[b : b + 1, rows]).sum().backward()
        torch.testing.assert_close(context.grad[b : b + 1, :n], cb.grad, rtol=1e-4, atol=1e-5)
        assert torch.equal(context.grad[b, n:], torch.zeros_like(context.grad[b, n:]))
        if not self_attention:
            torch.testing.assert_close(queries.grad[b : b + 1], qb.grad, rtol=1e-4, atol=1e-5)
        row_grads = [g + p.grad for g, p in zip(row_grads, layer.parameters())]
    for g_batch, g_rows in zip(batch_grads, row_grads):
        torch.testing.assert_close(g_batch, g_rows, rtol=1e-4, atol=1e-5)


def test_context_lengths():
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    lengths = context_lengths(mask, 3, 3)
    assert lengths.dtype == torch.int64 and lengths.tolist() == [2, 1, 3]
    assert context_lengths(mask, 3, 3) is lengths  # checked once per mask
    mask[1, 1] = True  # an in-place change is seen
    assert context_lengths(mask, 3, 3).tolist() == [2, 2, 3]


def test_context_mask_under_inference_mode():
    """Sampling runs under torch.inference_mode, where tensors have no version counter: the mask is
    checked every time (a bad one is still caught) and the lengths are a plain tensor."""
    layer = Attention(16, heads=2, context_dim=8)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    want = layer(x, ctx, mask)
    with torch.inference_mode():
        inference_mask = mask.clone()
        lengths = context_lengths(inference_mask, 2, 4)
        assert not lengths.is_inference() and lengths.tolist() == [2, 4]
        torch.testing.assert_close(layer(x, ctx, inference_mask), want, rtol=0, atol=0)
        torch.testing.assert_close(layer(x, ctx, mask), want, rtol=0, atol=0)
        inference_mask[0, 3] = True  # no version counter moves, yet the change is seen
        with pytest.raises(ValueError, match="row 0 is not a run"):
            layer(x, ctx, inference_mask)


def test_bad_context_mask():
    layer = Attention(16, heads=2, context_dim=8)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 4, 8)
    with pytest.raises(TypeError, match="context_mask must be a bool tensor"):
        layer(x, ctx, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"context_mask must have shape \[2, 4\]"):
        layer(x, ctx, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"row 1 is not a run of True then False: \[1, 0, 1, 0\]"):
        layer(x, ctx, torch.tensor([[True, True, True, True], [True, False, True, False]]))
    with pytest.raises(ValueError, match="row 0 has no True"):
        layer(x, ctx, torch.tensor([[False] * 4, [True] * 4]))
    with pytest.raises(ValueError, match="row 1 is not a run"):
        layer(x, ctx, torch.tensor([[True] * 4, [False, True, True, True]]))  # left padding
