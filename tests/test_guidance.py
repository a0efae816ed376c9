"""Classifier-free guidance against exact mixture denoisers, counted calls and clear errors."""

import math

import pytest
import torch

from stepdiff.denoisers import GaussianMixture, exact_denoiser
from stepdiff.guidance import ClassifierFreeGuidance
from stepdiff.metrics import mode_weights
from stepdiff.models.mlp import MLP
from stepdiff.parametrize import convert
from stepdiff.samplers import sample_ddpm
from stepdiff.schedules import VPCosineSchedule, VPLinearSchedule, time_grid

f64 = torch.float64


class MixtureClassModel:
    """A class-conditional exact denoiser (x0-prediction) of a Gaussian mixture.

    Class k's denoiser is the mixture restricted to the components labelled k (weights
    renormalised); the null class (index n_classes) is the whole mixture. Every call is recorded
    as (rows, rows with the null label), so tests can count the unconditional branch.
    """

    def __init__(self, means, std, component_class, schedule, prediction="x0"):
        self.means = torch.as_tensor(means, dtype=f64)
        self.component_class = torch.as_tensor(component_class)
        self.n_classes = int(self.component_class.max()) + 1
        self.null_class = self.n_classes
        self.schedule, self.prediction = schedule, prediction
        K = self.means.shape[0]
        self.full = GaussianMixture(self.means, torch.full((K,), std**2, dtype=f64))
        self.per_class = [GaussianMixture(self.means[self.component_class == k], std**2) for k in range(self.n_classes)]
        self.calls: list[tuple[int, int]] = []

    def target(self, k):
        return self.full if k == self.null_class else self.per_class[k]

    def __call__(self, x, t, y=None):
        t = torch.as_tensor(t, dtype=f64).expand(x.shape[0])
        y = torch.full((x.shape[0],), self.null_class) if y is None else y
        self.calls.append((x.shape[0], int((y == self.null_class).sum())))
        out = torch.empty_like(x)
        for k in y.unique().tolist():
            rows = y == k
            x0 = exact_denoiser(self.target(k), self.schedule)(x[rows], t[rows])
            out[rows] = convert(x0, x[rows], t[rows], self.schedule, "x0", self.prediction)
        return out


def four_blob_model(schedule, prediction="x0", std=0.8):
    means = [[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]
    return MixtureClassModel(means, std, [0, 0, 1, 1], schedule, prediction)


def test_w1_is_the_conditional_and_w0_the_unconditional_bit_for_bit():
    torch.manual_seed(0)
    net = MLP(dim=5, hidden=32, n_layers=2, n_classes=3).eval()
    x, t = torch.randn(7, 5), torch.rand(7)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    with torch.no_grad():
        cond, uncond = net(x, t, y=y), net(x, t, y=torch.full((7,), 3))
        assert torch.equal(ClassifierFreeGuidance(net, 1.0, y=y)(x, t), cond)
        assert torch.equal(ClassifierFreeGuidance(net, 0.0, y=y)(x, t), uncond)
        # a per-sample scale that is 1 (or 0) in some rows gives those rows exactly
        w = torch.tensor([1.0, 0.0, 2.5, 1.0, 0.0, 3.0, 1.0])
        g = ClassifierFreeGuidance(net, w, y=y)(x, t)
    assert torch.allclose(g[w == 1], cond[w == 1], atol=1e-6)
    assert torch.allclose(g[w == 0], uncond[w == 0], atol=1e-6)
    expected = uncond + w[:, None] * (cond - uncond)
    assert torch.allclose(g, expected, atol=1e-5)


def test_one_batched_call_with_both_branches():
    schedule = VPLinearSchedule()
    model = four_blob_model(schedule)
    x, t = torch.randn(9, 2, dtype=f64), torch.full((9,), 0.4, dtype=f64)
    ClassifierFreeGuidance(model, 3.0, y=torch.zeros(9, dtype=torch.long))(x, t)
    assert model.calls == [(18, 9)]  # one call: 9 conditional rows, 9 unconditional ones


@pytest.mark.parametrize("w", [0.5, 2.0, 4.5])
def test_guided_score_is_the_tilted_score(w):
    """On a mixture, CFG at w is exactly score_u + w (score_c - score_u), from any parametrization."""
    schedule = VPCosineSchedule()
    g = torch.Generator().manual_seed(1)
    B = 64
    x = 2.0 * torch.randn(B, 2, generator=g, dtype=f64)
    t = 0.05 + 0.9 * torch.rand(B, generator=g, dtype=f64)
    y = torch.randint(0, 2, (B,), generator=g)
    for prediction in ("x0", "eps", "v"):
        model = four_blob_model(schedule, prediction)
        guided = ClassifierFreeGuidance(model, w, y=y)(x, t)
        score = convert(guided, x, t, schedule, prediction, "score")
        score_u = model.full.score(x, t, schedule)
        score_c = torch.empty_like(x)
        for k in (0, 1):
            score_c[y == k] = model.per_class[k].score(x[y == k], t[y == k], schedule)
        expected = score_u + w * (score_c - score_u)
        torch.testing.assert_close(score, expected, rtol=1e-9, atol=1e-9)


def _class_mass(samples, model, k):
    weights = mode_weights(samples, model.means)
    return float(weights[model.component_class == k].sum())


def test_large_guidance_concentrates_on_the_class_components(one_thread):
    """Sampling class 0 of overlapping blobs: the mass nearest class 0's components grows with w.

    With w = 1 the sampler draws from the class-conditional law, whose mass on the side of its own
    components is Phi(1/0.8) = 0.894 (each blob is N(m, 0.8^2 I), the classes split at x = 0);
    unconditionally (w = 0) it is 1/2.
    """
    schedule = VPLinearSchedule()
    model = four_blob_model(schedule)
    ts = time_grid(200)
    n = 4000
    masses = {}
    for w in (0.0, 1.0, 3.0, 6.0):
        noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(5), dtype=f64)
        guided = ClassifierFreeGuidance(model, w, y=0)
        x = sample_ddpm(guided, noise, schedule, ts, prediction="x0", generator=7)
        masses[w] = _class_mass(x, model, 0)
    se = math.sqrt(0.25 / n)
    phi = 0.5 * (1 + math.erf(1 / 0.8 / math.sqrt(2)))
    assert abs(masses[0.0] - 0.5) < 4 * se
    assert abs(masses[1.0] - phi) < 4 * math.sqrt(phi * (1 - phi) / n)
    assert masses[3.0] > masses[1.0] + 0.05
    assert masses[6.0] > 0.99
    assert masses[6.0] >= masses[3.0]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_rescale_endpoints_and_formula(prediction):
    schedule = VPCosineSchedule()
    model = four_blob_model(schedule, prediction)
    g = torch.Generator().manual_seed(3)
    B, w = 32, 5.0
    x = 1.5 * torch.randn(B, 2, generator=g, dtype=f64)
    t = 0.1 + 0.8 * torch.rand(B, generator=g, dtype=f64)
    y = torch.randint(0, 2, (B,), generator=g)
    cond = model(x, t, y=y)
    uncond = model(x, t, y=torch.full((B,), 2))
    plain = uncond + w * (cond - uncond)
    kw = dict(y=y, prediction=prediction, schedule=schedule)
    assert torch.equal(
        ClassifierFreeGuidance(model, w, rescale=0.0, **kw)(x, t), ClassifierFreeGuidance(model, w, y=y)(x, t)
    )
    torch.testing.assert_close(ClassifierFreeGuidance(model, w, y=y)(x, t), plain, rtol=1e-12, atol=1e-12)

    def in_v(p):
        return convert(p, x, t, schedule, prediction, "v")

    full = ClassifierFreeGuidance(model, w, rescale=1.0, **kw)(x, t)
    # phi = 1: in v-space each sample has exactly the conditional's standard deviation
    torch.testing.assert_close(in_v(full).std(1), in_v(cond).std(1), rtol=1e-9, atol=1e-12)
    # phi = 0.3: the paper's mix, computed here by hand in v-space
    phi = 0.3
    v_plain, v_cond = in_v(plain), in_v(cond)
    rescaled = v_plain * v_cond.std(1, keepdim=True) / v_plain.std(1, keepdim=True)
    expected_v = phi * rescaled + (1 - phi) * v_plain
    got = ClassifierFreeGuidance(model, w, rescale=phi, **kw)(x, t)
    torch.testing.assert_close(in_v(got), expected_v, rtol=1e-9, atol=1e-9)
    # the rescale changes the guided prediction (it is not a no-op here)
    assert (in_v(got) - v_plain).abs().max() > 1e-3


def test_rescale_in_the_models_own_space_needs_no_schedule():
    schedule = VPCosineSchedule()
    model = four_blob_model(schedule, "eps")
    x, t = torch.randn(10, 2, dtype=f64), torch.full((10,), 0.5, dtype=f64)
    y = torch.ones(10, dtype=torch.long)
    out = ClassifierFreeGuidance(model, 4.0, y=y, rescale=1.0, rescale_on="eps", prediction="eps")(x, t)
    torch.testing.assert_close(out.std(1), model(x, t, y=y).std(1), rtol=1e-10, atol=1e-12)


def test_interval_is_honoured_and_skips_the_unconditional_branch():
    schedule = VPLinearSchedule()
    model = four_blob_model(schedule)
    B = 6
    x = torch.randn(B, 2, dtype=f64)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    guided = ClassifierFreeGuidance(model, 4.0, y=y, interval=(0.3, 0.7))
    # all outside: exactly the conditional model, and no null label ever reaches the model
    for t0 in (0.1, 0.9, 0.0, 1.0):
        t = torch.full((B,), t0, dtype=f64)
        model.calls.clear()
        out = guided(x, t)
        assert torch.equal(out, model(x, t, y=y))
        assert model.calls[0] == (B, 0)
    # inside (boundaries included): guided, both branches in one call
    for t0 in (0.3, 0.5, 0.7):
        t = torch.full((B,), t0, dtype=f64)
        model.calls.clear()
        out = guided(x, t)
        assert model.calls == [(2 * B, B)]
        expected = ClassifierFreeGuidance(model, 4.0, y=y)(x, t)
        assert torch.equal(out, expected)
    # mixed times: only the rows inside the interval get an unconditional row
    t = torch.tensor([0.1, 0.5, 0.9, 0.4, 0.2, 0.6], dtype=f64)
    model.calls.clear()
    out = guided(x, t)
    inside = (t >= 0.3) & (t <= 0.7)
    assert model.calls == [(B + int(inside.sum()), int(inside.sum()))]
    cond = model(x, t, y=y)
    uncond = model(x, t, y=torch.full((B,), 2))
    torch.testing.assert_close(out[~inside], cond[~inside], rtol=0, atol=0)
    torch.testing.assert_close(out[inside], (uncond + 4.0 * (cond - uncond))[inside], rtol=1e-12, atol=1e-12)


class TokenModel:
    """A stand-in text-conditioned model: the output depends on the non-pad token ids only."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, t, y):
        self.seen.append(y.clone())
        real = (y != 0).to(x.dtype)
        code = (y.to(x.dtype) * real).sum(1) / real.sum(1).clamp(min=1)
        return x * (1 + code[:, None]) + t[:, None]


def test_token_conditions_pad_the_null_row():
    model = TokenModel()
    x, t = torch.randn(3, 4, dtype=f64), torch.full((3,), 0.5, dtype=f64)
    y = torch.tensor([[5, 6, 7, 0], [3, 0, 0, 0], [4, 4, 0, 0]])
    empty = torch.tensor([1])  # e.g. a "no caption" row of one token
    with pytest.raises(ValueError, match="pad_id"):
        ClassifierFreeGuidance(model, 2.0, y=y, null=empty)(x, t)
    out = ClassifierFreeGuidance(model, 2.0, y=y, null=empty, pad_id=0)(x, t)
    assert model.seen[-1].shape == (6, 4) and torch.equal(model.seen[-1][3:], torch.tensor([[1, 0, 0, 0]] * 3))
    cond, uncond = model(x, t, y), model(x, t, torch.tensor([[1]] * 3))
    torch.testing.assert_close(out, uncond + 2.0 * (cond - uncond), rtol=1e-12, atol=1e-12)
    assert torch.equal(ClassifierFreeGuidance(model, 1.0, y=y, null=empty, pad_id=0)(x, t), cond)
    with pytest.raises(ValueError, match="null="):
        ClassifierFreeGuidance(model, 2.0, y=y)
    # a model that carries its empty caption and pad id (as TextConditioned does) needs neither
    model.null_ids, model.pad_id = torch.tensor([1]), 0
    assert torch.equal(ClassifierFreeGuidance(model, 2.0, y=y)(x, t), out)


class ContextModel:
    """A stand-in cross-attention model: the output depends on the masked mean of the context."""

    def __call__(self, x, t, context, context_mask):
        m = context_mask.to(x.dtype)[..., None]
        mean = (context * m).sum(1) / m.sum(1)
        return x + mean[:, : x.shape[1]] * t[:, None]


def test_context_conditions_and_padding():
    model = ContextModel()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, generator=g, dtype=f64), torch.rand(4, generator=g, dtype=f64)
    ctx = torch.randn(4, 5, 6, generator=g, dtype=f64)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 1 + [False] * 4, [True] * 4 + [False]])
    null_ctx = torch.randn(2, 6, generator=g, dtype=f64)
    kw = dict(context=ctx, context_mask=mask, null_context=null_ctx)
    out = ClassifierFreeGuidance(model, 3.0, **kw)(x, t)
    cond = model(x, t, ctx, mask)
    uncond = model(x, t, null_ctx.expand(4, -1, -1), torch.ones(4, 2, dtype=torch.bool))
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond), rtol=1e-12, atol=1e-12)
    assert torch.equal(ClassifierFreeGuidance(model, 1.0, **kw)(x, t), cond)
    assert torch.equal(ClassifierFreeGuidance(model, 0.0, **kw)(x, t), uncond)


def test_clear_errors():
    schedule = VPLinearSchedule()
    model = four_blob_model(schedule)
    x, t = torch.randn(4, 2, dtype=f64), torch.full((4,), 0.5, dtype=f64)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"w \(the guidance scale\) must be >= 0; got -0.5"):
        ClassifierFreeGuidance(model, -0.5, y=y)
    with pytest.raises(ValueError, match="w .* >= 0"):
        ClassifierFreeGuidance(model, torch.tensor([1.0, -1.0, 2.0, 0.0]), y=y)
    with pytest.raises(ValueError, match="y has batch 3"):
        ClassifierFreeGuidance(model, 2.0, y=torch.zeros(3, dtype=torch.long))(x, t)
    with pytest.raises(ValueError, match="w has 3 scales"):
        ClassifierFreeGuidance(model, torch.ones(3) * 2, y=y)(x, t)
    for bad in [(-0.1, 0.5), (0.2, 1.5), (0.7, 0.3)]:
        with pytest.raises(ValueError, match="interval"):
            ClassifierFreeGuidance(model, 2.0, y=y, interval=bad)
    with pytest.raises(ValueError, match="null_class"):
        ClassifierFreeGuidance(MLP(dim=2, hidden=8, n_layers=1), 2.0, y=y)
    with pytest.raises(ValueError, match="exactly one condition"):
        ClassifierFreeGuidance(model, 2.0)
    with pytest.raises(ValueError, match="rescale"):
        ClassifierFreeGuidance(model, 2.0, y=y, rescale=1.5)
    with pytest.raises(ValueError, match="prediction="):
        ClassifierFreeGuidance(model, 2.0, y=y, rescale=0.5)
    with pytest.raises(ValueError, match="schedule="):
        ClassifierFreeGuidance(model, 2.0, y=y, rescale=0.5, prediction="eps")
    # a null class given explicitly works for a model without null_class
    out = ClassifierFreeGuidance(lambda x, t, y: x * (y[:, None] + 1), 2.0, y=y, null=5)(x, t)
    torch.testing.assert_close(out, 6 * x + 2 * (x - 6 * x))


def test_package_models_class_and_text_conditioned(one_thread):
    """The wrapper on the package's own networks: a class-conditional UNet and a text-conditioned one."""
    from stepdiff.models import TextConditioned, TextEncoder, UNet, UNetConfig
    from stepdiff.text import Tokenizer

    torch.manual_seed(0)
    cfg = dict(in_channels=1, channels=8, channel_mult=(1, 2), attn_levels=(1,), heads=2, norm_groups=4)
    unet = UNet(UNetConfig(n_classes=3, **cfg)).eval()
    tok = Tokenizer()
    text = TextConditioned(
        UNet(UNetConfig(context_dim=16, **cfg)),
        TextEncoder(tok.vocab_size, dim=16, depth=1, heads=2),
        tok.pad_id,
        tok.empty(1),
    ).eval()
    for net in (unet, text):
        with torch.no_grad():
            for p in net.parameters():  # the output layer starts at zero: give every weight a value
                p.normal_(0, 0.1)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.5, 0.9])
    y = torch.tensor([0, 2, 1])
    ids = tok.encode(["a red circle", "a small blue square at the top left", "a star"])
    with torch.no_grad():
        for net, cond, null in ((unet, y, torch.full((3,), 3)), (text, ids, tok.empty(3, ids.shape[1]))):
            c, u = net(x, t, y=cond), net(x, t, y=null)
            assert (c - u).abs().max() > 1e-4  # the condition matters
            assert torch.equal(ClassifierFreeGuidance(net, 1.0, y=cond)(x, t), c)
            assert torch.equal(ClassifierFreeGuidance(net, 0.0, y=cond)(x, t), u)
            torch.testing.assert_close(
                ClassifierFreeGuidance(net, 2.5, y=cond)(x, t), u + 2.5 * (c - u), rtol=1e-5, atol=1e-6
            )
