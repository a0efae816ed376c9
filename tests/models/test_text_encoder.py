"""Tests for stepdiff.models.text: the text encoder (shapes, mask, padding invariance, the attention
against the reference path, errors) and TextConditioned (token rows as the condition, the
"no caption" rows, guidance and label dropout on token rows, learning a caption, bf16, errors).

A stand-in vocabulary keeps these tests independent of the tokenizer: ids 0..VOCAB-1 with
0 = padding, 2 = begin and 3 = end of a row."""

from __future__ import annotations

import pytest
import torch

from stepdiff.guidance import ClassifierFreeGuidance
from stepdiff.models.dit import DiT, DiTConfig
from stepdiff.models.text import TextConditioned, TextEncoder
from stepdiff.models.unet import UNet, UNetConfig
from stepdiff.samplers import sample_euler
from stepdiff.schedules import FlowMatchingSchedule, time_grid
from stepdiff.train import diffusion_loss

VOCAB, PAD, BOS, EOS = 23, 0, 2, 3
NULL = torch.tensor([BOS, EOS])  # the empty caption


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids the workers' synchronisation on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rows(lengths: list[int], L: int | None = None, seed: int = 0) -> torch.Tensor:
    """Token rows <bos> words <eos> of the given total lengths, right-padded to L."""
    g = torch.Generator().manual_seed(seed)
    L = L or max(lengths)
    ids = torch.full((len(lengths), L), PAD, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(4, VOCAB, (n,), generator=g)
        ids[b, 0] = BOS
        if n > 1:
            ids[b, n - 1] = EOS
    return ids


def encoder(seed: int = 0, **kw) -> TextEncoder:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TextEncoder(VOCAB, **{**dict(dim=16, depth=2, heads=2, max_len=12), **kw})


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def text_unet(seed: int = 0, dim: int = 16) -> TextConditioned:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet(UNetConfig(channels=8, channel_mult=(1, 2), attn_levels=(1,), heads=2, norm_groups=4,
                               context_dim=dim))
    return TextConditioned(unet, encoder(seed, dim=dim), PAD, NULL)


# --- the encoder --------------------------------------------------------------------------------


def test_encoder_shapes_and_mask():
    enc = encoder()
    ids = rows([5, 2, 9, 1], L=10)
    context, mask = enc(ids)
    assert context.shape == (4, 10, 16) and context.dtype == torch.float32
    assert torch.equal(mask, ids != PAD)
    assert mask.sum(1).tolist() == [5, 2, 9, 1]
    # The final LayerNorm: every token's features have mean 0 and variance 1 (before its affine map).
    torch.testing.assert_close(context.mean(-1), torch.zeros(4, 10), atol=1e-5, rtol=0)


def test_encoder_padding_changes_nothing():
    """A row's real tokens are encoded the same alone, in a padded batch, or with more padding;
    gradients through the real tokens match too."""
    enc = encoder().double()
    lengths = [6, 3, 1]
    ids = rows(lengths, L=11)
    context, mask = enc(ids)
    weight = torch.randn(context.shape, dtype=torch.float64) * mask[:, :, None]
    (context * weight).sum().backward()
    batch_grads = [p.grad.clone() for p in enc.parameters()]
    row_grads = [torch.zeros_like(p) for p in enc.parameters()]
    for b, n in enumerate(lengths):
        enc.zero_grad()
        alone, _ = enc(ids[b : b + 1, :n])
        torch.testing.assert_close(context[b : b + 1, :n], alone, rtol=1e-10, atol=1e-12)
        (alone * weight[b : b + 1, :n]).sum().backward()
        row_grads = [g + p.grad for g, p in zip(row_grads, enc.parameters())]
    for g_batch, g_rows in zip(batch_grads, row_grads):
        torch.testing.assert_close(g_batch, g_rows, rtol=1e-9, atol=1e-12)


def test_encoder_attention_matches_the_reference_path():
    tri = perturb(encoder(attn_backend="triton"))
    ref = encoder(attn_backend="torch")
    ref.load_state_dict(tri.state_dict())
    ids = rows([7, 2, 4], L=8)
    outs, grads = [], []
    for enc in (tri, ref):
        context, mask = enc(ids)
        (context * mask[:, :, None]).square().sum().backward()
        outs.append(context[mask])
        grads.append([p.grad for p in enc.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    # fp32 sums in another order: errors of order 1e-6 of the largest gradient entry (the key
    # biases' gradients are zero in exact arithmetic, rounding noise here).
    scale = max(float(g.abs().max()) for g in grads[1])
    for g_tri, g_ref in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(g_tri, g_ref, rtol=1e-4, atol=1e-5 * scale)


def test_encoder_errors():
    enc = encoder()
    with pytest.raises(ValueError, match="ids must be integer token rows"):
        enc(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ids must be integer token rows"):
        enc(torch.tensor([2, 5, 3]))
    with pytest.raises(ValueError, match=r"ids must lie in 0..22.*\[2, 23\]"):
        enc(torch.tensor([[2, 23, 3]]))
    with pytest.raises(ValueError, match="1..12 tokens"):
        enc(rows([13]))
    with pytest.raises(ValueError, match=r"row 1 is \[2, 0, 5, 3\]"):
        enc(torch.tensor([[2, 5, 6, 3], [2, 0, 5, 3]]))
    with pytest.raises(ValueError, match=r"row 0 is \[0, 0\]"):
        enc(torch.tensor([[0, 0], [2, 3]]))
    with pytest.raises(ValueError, match="heads 3 does not divide dim 16"):
        TextEncoder(VOCAB, dim=16, heads=3)
    with pytest.raises(ValueError, match="pad_id must be a token id"):
        TextEncoder(VOCAB, pad_id=VOCAB)
    for depth in (-1, True, 1.0):
        with pytest.raises(ValueError, match=r"depth must be an integer >= 0"):
            TextEncoder(VOCAB, depth=depth)


def test_depth_zero_is_a_lookup():
    """With no blocks each token's context is LN(E[id] + P[i]), computed here by hand in float64
    (with LayerNorm's affine map made non-trivial); a token's vector does not depend on any other
    token of its row, and the lookup rows learn: a gradient reaches exactly the rows used."""
    enc = perturb(encoder(depth=0)).double()
    with torch.no_grad():
        enc.norm.weight.add_(0.3 * torch.randn(16, dtype=torch.float64))
    assert len(enc.blocks) == 0
    ids = rows([7, 4, 1], L=9, seed=3)
    context, mask = enc(ids)
    h = enc.token_embed.weight[ids] + enc.pos_embed.weight[: ids.shape[1]][None]
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    want = (h - mu) / torch.sqrt(var + enc.norm.eps) * enc.norm.weight + enc.norm.bias
    torch.testing.assert_close(context, want, rtol=1e-12, atol=1e-12)
    changed = ids.clone()
    changed[0, 2] = 4 if int(ids[0, 2]) != 4 else 5
    other, _ = enc(changed)
    keep = torch.ones_like(mask)
    keep[0, 2] = False
    torch.testing.assert_close(other[keep], context[keep], rtol=0, atol=0)
    assert not torch.allclose(other[0, 2], context[0, 2])
    (context * mask[..., None]).square().sum().backward()
    used = torch.zeros(VOCAB, dtype=torch.bool)
    used[ids[mask]] = True
    assert bool((enc.token_embed.weight.grad[used].abs().sum(1) > 0).all())
    assert bool((enc.token_embed.weight.grad[~used] == 0).all())


def test_one_hot_tokens():
    """``one_hot``: the context is the one-hot row of each real token and zero at padding, with no
    parameters; a linear map of it is then a free row per word (column ``id`` of the map)."""
    enc = TextEncoder(VOCAB, dim=VOCAB, depth=0, max_len=12, one_hot=True)
    assert sum(p.numel() for p in enc.parameters()) == 0
    ids = rows([6, 3, 1], L=8, seed=5)
    context, mask = enc(ids)
    want = torch.zeros(3, 8, VOCAB)
    for b in range(3):
        for i in range(8):
            if ids[b, i] != PAD:
                want[b, i, ids[b, i]] = 1.0
    assert torch.equal(context, want) and torch.equal(mask, ids != PAD)
    w = torch.randn(5, VOCAB)
    assert torch.equal(context[0, 1] @ w.T, w[:, ids[0, 1]])
    for kw, match in ((dict(dim=VOCAB, depth=1), "one_hot needs depth 0"), (dict(dim=16, depth=0), "dim = vocab_size"),
                      (dict(dim=VOCAB, depth=0, one_hot=1), "one_hot must be true or false")):
        with pytest.raises(ValueError, match=match):
            TextEncoder(VOCAB, **{"one_hot": True, **kw})


def test_one_hot_configuration():
    """``[model.text] one_hot = true`` (with depth = 0 and no CLIP) gives the denoiser a context as wide as
    the caption vocabulary, and a pool whose column per word is that word's own row; a one-hot table with
    blocks or a CLIP tower is an error naming the option."""
    from stepdiff.config import ConfigError, build_model, load_config, resolve, set_value
    from stepdiff.text import Tokenizer

    def config(*assignments):
        raw = load_config("shapes-pixel-t2i")
        for a in ('model.text.clip=""', *assignments):
            raw = set_value(raw, a)
        return resolve(raw)

    model = build_model(config("model.text.one_hot=true", "model.text.depth=0", "model.pooled_context=true"))
    vocab = Tokenizer().vocab_size
    assert model.encoder.one_hot and model.denoiser.config.context_dim == vocab
    assert model.denoiser.pooled.weight.shape[1] == vocab
    ids = Tokenizer().encode(["a circle", "a large red star at the top"])
    context, _ = model.encoder(ids)
    assert torch.equal(context.sum(-1), (ids != 0).float())
    for bad in (("model.text.one_hot=true",), ("model.text.one_hot=true", "model.text.depth=0",
                                                 'model.text.clip="shapes-clip"')):
        with pytest.raises(ConfigError, match=r"\[model.text\] one_hot"):
            config(*bad)


# --- TextConditioned -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_text_conditioned_is_the_encoder_then_the_denoiser(kind):
    if kind == "unet":
        model = text_unet()
    else:
        torch.manual_seed(0)
        dit = DiT(DiTConfig(hidden=16, depth=2, heads=2, context_dim=16))
        model = TextConditioned(dit, encoder(dim=16), PAD, NULL[None])  # null_ids [1, L0] also works
    perturb(model.denoiser)
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    ids = rows([4, 7, 2])
    context, mask = model.encoder(ids)
    want = model.denoiser(x, t, context=context, context_mask=mask)
    torch.testing.assert_close(model(x, t, ids), want, rtol=0, atol=0)
    # More padding columns on the right change nothing.
    torch.testing.assert_close(model(x, t, torch.nn.functional.pad(ids, (0, 4))), want, rtol=1e-6, atol=1e-6)
    # A conditional input changes the output (the cross-attention is live after perturb).
    assert not torch.allclose(model(x, t, rows([4, 7, 2], seed=1)), want)


def test_uncaptioned_rows_are_the_null_caption():
    """y=None and all-padding rows (what label dropout writes with model.null_class) both mean the
    empty caption; in a mixed batch each row gets its own condition."""
    model = perturb(text_unet())
    assert model.null_class == PAD
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    ids = rows([5, 3, 4])
    null_rows = NULL[None].expand(3, -1)
    want_null = model(x, t, null_rows)
    torch.testing.assert_close(model(x, t), want_null, rtol=0, atol=0)
    torch.testing.assert_close(model(x, t, torch.full_like(ids, model.null_class)), want_null, rtol=1e-6, atol=1e-6)
    # Label dropout on token rows: drop the middle row, as train() does for labels, per row.
    drop = torch.tensor([False, True, False])
    dropped = torch.where(drop[:, None], torch.full_like(ids, model.null_class), ids)
    out = model(x, t, dropped)
    for b in range(3):
        row = null_rows[b : b + 1] if drop[b] else ids[b : b + 1]
        torch.testing.assert_close(out[b : b + 1], model(x[b : b + 1], t[b : b + 1], row), rtol=1e-5, atol=1e-6)


def test_guidance_on_token_rows():
    """ClassifierFreeGuidance with token rows: w = 2 is u + 2 (c - u) of the two branches."""
    model = perturb(text_unet())
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    ids = rows([6, 3])
    guided = ClassifierFreeGuidance(model, 2.0, y=ids, null=NULL, pad_id=PAD)
    c, u = model(x, t, ids), model(x, t, NULL[None].expand(2, -1))
    torch.testing.assert_close(guided(x, t), u + 2.0 * (c - u), rtol=1e-5, atol=1e-6)


def test_guided_sampling_under_inference_mode():
    """A whole guided sampler run (one batched call per step for both branches, rows of several
    lengths) under torch.inference_mode equals the same run under no_grad."""
    model = perturb(text_unet())
    ids = rows([6, 3, 2])
    guided = ClassifierFreeGuidance(model, 3.0, y=ids, null=NULL, pad_id=PAD)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    fm, ts = FlowMatchingSchedule(), time_grid(4)
    with torch.no_grad():
        want = sample_euler(guided, noise, fm, ts, prediction="velocity")
    with torch.inference_mode():
        got = sample_euler(guided, noise, fm, ts, prediction="velocity")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.isfinite(got).all() and not torch.equal(got, noise)


def test_a_caption_is_learned():
    """Two captions for images of opposite sign: after a few Adam steps through encoder and UNet,
    the loss with the right captions is far below the loss with the captions swapped."""
    torch.manual_seed(2)
    model = text_unet()
    captions = rows([4, 3], L=4, seed=3)  # caption 0 and caption 1
    labels = torch.arange(16) % 2
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.ones(16, 3, 8, 8) + 0.1 * torch.randn(16, 3, 8, 8, generator=g)
    x0 = torch.where(labels[:, None, None, None] == 0, x0, -x0)
    fm = FlowMatchingSchedule()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(40):
        loss = diffusion_loss(model, x0, fm, y=captions[labels], prediction="velocity", generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in model.encoder.parameters())
    g = torch.Generator().manual_seed(5)
    t, noise = 0.05 + 0.9 * torch.rand(16, generator=g), torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        right = diffusion_loss(model, x0, fm, y=captions[labels], t=t, noise=noise, prediction="velocity")
        swapped = diffusion_loss(model, x0, fm, y=captions[1 - labels], t=t, noise=noise, prediction="velocity")
    assert swapped > 1.5 * right


def test_bf16_autocast():
    model = perturb(text_unet(), std=0.2)
    x, t, ids = torch.randn(3, 3, 8, 8), torch.rand(3), rows([5, 2, 8])
    want = model(x, t, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, ids)
        out.square().mean().backward()
    assert out.dtype == torch.float32
    assert float((out - want).detach().norm() / want.detach().norm()) < 0.03
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_text_conditioned_errors():
    unet = UNet(UNetConfig(channels=8, channel_mult=(1, 2), heads=2, norm_groups=4, attn_levels=(1,), context_dim=8))
    with pytest.raises(ValueError, match=r"context_dim \(8\) must equal the encoder's dim \(16\)"):
        TextConditioned(unet, encoder(dim=16), PAD, NULL)
    with pytest.raises(ValueError, match="pad_id 1 differs"):
        TextConditioned(unet, encoder(dim=8), 1, NULL)
    with pytest.raises(ValueError, match=r"row 0 is \[0, 0\]"):
        TextConditioned(unet, encoder(dim=8), PAD, torch.tensor([PAD, PAD]))
    with pytest.raises(ValueError, match="null_ids must be one row"):
        TextConditioned(unet, encoder(dim=8), PAD, torch.tensor([[2, 3], [2, 3]]))
    model = TextConditioned(unet, encoder(dim=8), PAD, NULL)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    with pytest.raises(ValueError, match="pass y, not context"):
        model(x, t, context=torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"y must be token rows \[2, L\]"):
        model(x, t, torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="ids must lie in"):
        model(x, t, torch.tensor([[2, 40, 3], [2, 5, 3]]))
