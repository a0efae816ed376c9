"""Tests for stepdiff.models.mlp: shapes, the time embedding, class conditioning, errors."""

import math

import pytest
import torch

from stepdiff.models.mlp import MLP, MLPConfig, TimeEmbedding
from stepdiff.samplers import sample_euler
from stepdiff.schedules import FlowMatchingSchedule, time_grid


def make(seed=0, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP(**kw)


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_shapes_and_dtype(dim):
    model = make(dim=dim, hidden=32, n_layers=2)
    x = torch.randn(7, dim)
    out = model(x, torch.rand(7))
    assert out.shape == (7, dim) and out.dtype == torch.float32
    assert model(x, 0.3).shape == (7, dim)  # a scalar time is broadcast
    assert torch.equal(model(x, 0.3), model(x, torch.full((7,), 0.3)))
    double = make(dim=dim, hidden=32, n_layers=2).double()
    assert double(x.double(), torch.rand(7, dtype=torch.float64)).dtype == torch.float64


def test_config_object_and_keywords_agree():
    a = make(3, hidden=48, n_layers=4)
    b = make(3, config=MLPConfig(hidden=48, n_layers=4))
    x, t = torch.randn(5, 2), torch.rand(5)
    assert torch.equal(a(x, t), b(x, t))
    assert len(a.blocks) == 4 and a.config.hidden == 48
    with pytest.raises(TypeError, match="either"):
        MLP(MLPConfig(), hidden=8)


def test_the_output_depends_on_time_and_input_and_gradients_flow():
    model = make()
    x = torch.randn(16, 2, requires_grad=True)
    t = torch.rand(16, requires_grad=True)
    out = model(x, t)
    assert not torch.allclose(out, model(x, t * 0.5))
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert t.grad is not None and t.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_time_embedding_features():
    emb = TimeEmbedding(n_freqs=4, max_freq=1000.0)
    t = torch.tensor([0.0, 0.25, 1.0])
    e = emb(t)
    assert e.shape == (3, 8)
    omegas = torch.tensor([1.0, 10.0, 100.0, 1000.0])  # 1000^(k/3), k = 0..3
    expected = torch.cat([torch.sin(t[:, None] * omegas), torch.cos(t[:, None] * omegas)], 1)
    assert torch.allclose(e, expected, atol=1e-4)
    assert torch.equal(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    # Near t = 0 the fast features still separate times 1e-3 apart.
    close = emb(torch.tensor([1e-3, 2e-3]))
    assert (close[0] - close[1]).abs().max() > 0.5
    assert TimeEmbedding(1, 10.0)(t).shape == (3, 2)


def test_class_conditioning_and_the_null_class():
    model = make(n_classes=3, hidden=32)
    assert model.null_class == 3 and make().null_class is None
    x, t = torch.randn(6, 2), torch.rand(6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cond = model(x, t, y)
    assert cond.shape == (6, 2)
    assert not torch.allclose(cond, model(x, t, torch.zeros(6, dtype=torch.long)))
    # No labels means the null class for every sample.
    assert torch.equal(model(x, t), model(x, t, torch.full((6,), 3)))
    assert model.class_embed.num_embeddings == 4


def test_bad_input_raises_clear_errors():
    model = make(hidden=16)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2\]"):
        model(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2\]"):
        model(torch.randn(4, 2, 1), torch.rand(4))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[4\]"):
        model(torch.randn(4, 2), torch.rand(3))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(4, 2), torch.rand(4), torch.zeros(4, dtype=torch.long))
    conditional = make(n_classes=2, hidden=16)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        conditional(torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer labels"):
        conditional(torch.randn(4, 2), torch.rand(4), torch.zeros(4))
    for bad in (dict(hidden=0), dict(n_layers=-1), dict(n_classes=-1), dict(max_freq=0.5), dict(activation="tanh")):
        with pytest.raises(ValueError):
            MLPConfig(**bad)


def test_seeded_init_is_reproducible_and_small():
    a, b = make(5), make(5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(make(6).output.weight, a.output.weight)
    # The default network: a few hundred thousand parameters at most, a fraction of a MB.
    n = a.num_parameters()
    c = a.config
    blocks = c.n_layers * (2 * (c.hidden * c.hidden + c.hidden) + c.hidden * c.hidden + 2 * c.hidden)
    time_mlp = 2 * c.n_freqs * c.hidden + c.hidden + c.hidden * c.hidden + c.hidden
    io = (c.dim * c.hidden + c.hidden) + 2 * c.hidden + (c.hidden * c.dim + c.dim)
    assert n == blocks + time_mlp + io and n < 300_000


def test_works_as_a_sampler_model():
    model = make(hidden=16, n_layers=1)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = sample_euler(model, x, FlowMatchingSchedule(), time_grid(4), prediction="velocity")
    assert out.shape == (10, 2) and torch.isfinite(out).all()
    assert not math.isclose(float((out - x).abs().sum()), 0.0)
