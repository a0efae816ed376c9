r"""Editing with a trained denoiser: SDEdit and inpainting (replacement, RePaint, a masked-input model).

Both reuse a model trained only to denoise, and both rest on one fact: the forward process is
known, so any image can be put on the path at any time $t$ by
$x_t = \alpha(t)\,x_0 + \sigma(t)\,\varepsilon$ ({func}`stepdiff.forward.add_noise`).

**SDEdit** (Meng et al. 2022). Noise the input $x$ to a strength $s \in [0, 1]$ and run any
sampler of {mod}`stepdiff.samplers` from $t = s$ down to 0:

$$x_s = \alpha(s)\,x + \sigma(s)\,\varepsilon,\qquad \hat x = \mathrm{Sampler}(x_s;\ s = t_0 > t_1 > \dots > t_n = 0).$$

At $s = 0$ the input comes back unchanged; as $s$ grows the output forgets more of the input
and looks more like a sample of the model, and at $s = 1$ on a schedule with $\alpha(1) = 0$
it is an ordinary sample from the same noise. With the exact denoiser and a stochastic
sampler the reverse run draws from $p(x_0\mid x_s)$, so if $x$ is a sample of the data the
output is one too, at every $s$ ({func}`sdedit`).

**Inpainting.** A mask $m$ (1 on the known pixels) and a known image $x^{\rm known}$; fill the
rest. {func}`inpaint` runs a reverse sampler and, after every step to a time $s$, replaces the
known region by the known image noised to $s$ (the "replacement" method of Song et al. 2021):

$$x_s \leftarrow m\odot\big(\alpha(s)\,x^{\rm known} + \sigma(s)\,\varepsilon'\big) + (1 - m)\odot x_s.$$

The unknown region then only sees the known one through the denoiser, one step at a time, and
is never told that the two must agree, so the fill is less coherent than the true conditional.
RePaint (Lugmayr et al. 2022, Algorithm 1) *resamples*: after a stretch of ``jump`` reverse
steps it goes back up by re-noising the whole image with the forward transitions
({func}`stepdiff.forward.transition`) and comes down again, ``resample`` times in all, which lets
the two regions harmonise ({func}`repaint_levels` gives the walk).

The third way trains the model with the mask as input: {class}`MaskedInputDenoiser` concatenates
the mask and the masked image to $x_t$ as extra channels (as Stable Diffusion's inpainting
model does), trained by {func}`masked_diffusion_loss` on random masks ({func}`random_box_masks`),
and sampled by {func}`inpaint_with_model`. Every method returns the known region exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .forward import add_noise, transition
from .kernels import affine_step
from .parametrize import PREDICTIONS, convert
from .samplers import SAMPLERS, ddim_coefficients
from .schedules import Schedule, time_grid

__all__ = [
    "sdedit",
    "blocky_sketch",
    "check_strength",
    "check_mask",
    "repaint_levels",
    "inpaint",
    "MaskedInputDenoiser",
    "random_box_masks",
    "masked_diffusion_loss",
    "masked_loss_fn",
    "inpaint_with_model",
]

Model = Callable[[Tensor, Tensor], Tensor]
f64 = torch.float64


# --- argument checks ---------------------------------------------------------------------------


def _check_batch(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] < 1:
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point batch [B, ...] (B >= 1); got {desc}")


def _generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    if isinstance(generator, bool):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None; got {generator!r}")
    if isinstance(generator, int):
        return torch.Generator(device=device).manual_seed(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None; got {type(generator).__name__}")
    return generator


def check_strength(strength: float | Tensor) -> float:
    """The SDEdit strength as a float in $[0, 1]$; ``ValueError`` naming ``strength`` otherwise."""
    if isinstance(strength, bool):
        raise ValueError(f"strength must be a number in [0, 1]; got {strength!r}")
    if isinstance(strength, Tensor):
        if strength.numel() != 1 or strength.is_complex():
            raise ValueError(f"strength must be one number in [0, 1]; got a tensor of shape {tuple(strength.shape)}")
        strength = strength.item()
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a number in [0, 1]; got {type(strength).__name__}") from None
    if not 0.0 <= s <= 1.0:  # also rejects NaN
        raise ValueError(f"strength must lie in [0, 1] (0: return the input, 1: start from pure noise); got {s}")
    return s


def check_mask(mask: Tensor, x: Tensor, name: str = "mask") -> Tensor:
    r"""Check an inpainting mask against the images ``x`` ``[B, ...]`` and return it as a bool tensor $m$.

    $m = 1$ (``True``) marks a **known** entry, kept; $m = 0$ (``False``) an entry to fill. The mask has the
    number of dimensions of ``x``, and each of its sizes equals that of ``x`` or is 1 (broadcast:
    ``[B, 1, H, W]`` for every channel of a pixel, ``[1, 1, H, W]`` for the whole batch). Its
    dtype is ``bool``, or an integer or floating dtype holding only 0 and 1; anything else
    (a soft mask, a float with values like 0.5) is an error naming the argument.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a tensor (bool, or 0/1 values); got {type(mask).__name__}")
    if mask.ndim != x.ndim or any(m not in (1, n) for m, n in zip(mask.shape, x.shape)):
        raise ValueError(
            f"{name} must have {x.ndim} dimensions, each equal to that of the images {tuple(x.shape)} or 1 "
            f"(e.g. {(x.shape[0], 1, *x.shape[2:]) if x.ndim == 4 else tuple(x.shape)}); got shape {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        out = mask
    elif mask.is_complex() or not (mask.is_floating_point() or mask.dtype in (
        torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64
    )):
        raise ValueError(f"{name} must be bool or hold 0/1 in an integer or float dtype; got dtype {mask.dtype}")
    else:
        ok = (mask == 0) | (mask == 1)
        if not bool(ok.all()):
            bad = mask[~ok].flatten()[:3].tolist()
            raise ValueError(
                f"{name} must hold only 0 (fill) and 1 (known); got dtype {mask.dtype} with values such as {bad} "
                "(a soft mask is not an inpainting mask: threshold it first)"
            )
        out = mask != 0
    if out.device != x.device:
        raise ValueError(f"{name} is on {out.device} but the images are on {x.device}")
    return out


# --- SDEdit ------------------------------------------------------------------------------------


def _sampler(sampler: str | Callable) -> Callable:
    if callable(sampler):
        return sampler
    try:
        return SAMPLERS[sampler]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)} or pass a function") from None


def sdedit(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    strength: float,
    *,
    n_steps: int = 50,
    spacing: str = "uniform",
    sampler: str | Callable = "ddim",
    prediction: str = "x0",
    noise: Tensor | None = None,
    generator: torch.Generator | int | None = None,
    **sampler_kwargs,
) -> Tensor:
    r"""SDEdit (Meng et al. 2022): noise ``x`` to time $s$ = ``strength``, then denoise from $t = s$.

    $x_s = \alpha(s)\,x + \sigma(s)\,\varepsilon$ with $\varepsilon$ = ``noise`` (or drawn from
    ``generator``), then ``sampler`` (a name in {data}`stepdiff.samplers.SAMPLERS` or a function
    ``f(model, x, schedule, ts, prediction=..., **kw)``) runs over the grid
    ``time_grid(n_steps, spacing, schedule, t_max=s)``, which falls from $s$ to 0. A stochastic
    sampler gets the same ``generator`` (after the noising draw) unless ``sampler_kwargs``
    name one. ``n_steps`` counts the steps of this partial run; to keep the step size of a full
    $N$-step run use $\lceil sN\rceil$.

    ``strength = 0`` returns a copy of ``x`` (no model call). ``strength = 1`` on a schedule with
    $\alpha(1) = 0$ (flow matching, the cosine VP schedule) is the sampler run from
    $\sigma(1)\varepsilon$, the same as sampling from that noise; where $\alpha(1) > 0$ a trace
    $\alpha(1)\,x$ of the input remains. ``x``: ``[B, ...]`` (images ``[B, C, H, W]`` or points
    ``[B, d]``). Returns a tensor shaped like ``x``.
    """
    s = check_strength(strength)
    _check_batch(x, "x")
    if s == 0.0:
        return x.clone()
    fn = _sampler(sampler)
    g = _generator(generator, x.device)
    if noise is not None and (not isinstance(noise, Tensor) or noise.shape != x.shape):
        shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}; got {shape}")
    ts = time_grid(n_steps, spacing, schedule, t_max=s)
    x_s, _ = add_noise(x, s, schedule, noise=noise, generator=g)
    if "generator" not in sampler_kwargs and "generator" in inspect.signature(fn).parameters:
        sampler_kwargs["generator"] = g
    return fn(model, x_s, schedule, ts, prediction=prediction, **sampler_kwargs)


def blocky_sketch(images: Tensor, factor: int = 2, threshold: float = 0.0) -> Tensor:
    r"""A crude, blocky two-tone sketch of images ``[B, C, H, W]`` in $[-1, 1]$: an input for SDEdit.

    Each $f\times f$ block (``factor``) is averaged, set to $+1$ where the average exceeds $\tau$
    (``threshold``) and to $-1$ elsewhere, and blown back up by repetition:
    $\tilde x = \mathrm{up}_f\big(2\cdot\mathbb 1[\mathrm{avg}_f(x) > \tau] - 1\big)$. The result keeps
    the layout of the image (a digit stays legible) but has none of its texture: hard edges, two
    grey levels, steps of $f$ pixels. ``H`` and ``W`` must be multiples of ``factor``.
    """
    _check_batch(images, "images")
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W]; got shape {tuple(images.shape)}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer; got {factor!r}")
    H, W = images.shape[2:]
    if H % factor or W % factor:
        raise ValueError(f"factor must divide the image size {H}x{W}; got factor = {factor}")
    avg = torch.nn.functional.avg_pool2d(images, factor)
    two_tone = torch.where(avg > threshold, 1.0, -1.0).to(images.dtype)
    return two_tone.repeat_interleave(factor, 2).repeat_interleave(factor, 3)


# --- inpainting: replacement and RePaint ------------------------------------------------------


def repaint_levels(n_steps: int, jump: int = 1, resample: int = 1) -> list[int]:
    r"""The walk of RePaint over the levels $n, n-1, \dots, 0$ of an $n$-step grid.

    Level $\ell$ is grid time ``ts[n - l]`` ($\ell = n$ the noise, $0$ the data). The walk goes
    down one level at a time; on arriving at a level $\ell \ge 1$ that is a multiple of ``jump``
    it goes back up ``jump`` levels and down again, ``resample - 1`` times, so every stretch of
    ``jump`` reverse steps is run ``resample`` times (Lugmayr et al. 2022, their ``jump_length``
    and ``jump_n_sample``; their ``U`` = ``resample`` with ``jump = 1``). ``resample = 1`` is plain
    descent, ``[n, n-1, ..., 0]``. The walk never leaves level 0, so it ends with a reverse step.
    Reverse steps: $n + (\text{resample} - 1)\cdot\text{jump}\cdot\lfloor (n - 1)/\text{jump}\rfloor$
    when ``jump`` $\le n$.
    """
    for name, value in (("n_steps", n_steps), ("jump", jump), ("resample", resample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    level, walk = n_steps, [n_steps]
    for _ in range(n_steps):
        level -= 1
        walk.append(level)
        if level >= 1 and level % jump == 0:
            for _ in range(resample - 1):
                walk.extend(range(level + 1, level + jump + 1))
                walk.extend(range(level + jump - 1, level - 1, -1))
    return walk


def _x0_hat(model: Model, x: Tensor, t: Tensor, schedule: Schedule, prediction: str) -> Tensor:
    """The model's $\\hat x_0$ at the float64 scalar time ``t`` (converted from ``prediction``)."""
    out = model(x, t.to(device=x.device, dtype=x.dtype).expand(x.shape[0]))
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model returned {shape} for x of shape {tuple(x.shape)}; it must match")
    out = out.to(x.dtype)
    return out if prediction == "x0" else convert(out, x, t, schedule, prediction, "x0")


def _noised(x_known: Tensor, t: Tensor, schedule: Schedule, g: torch.Generator | None) -> Tensor:
    """The known image on the path at time ``t``; at $t = 0$ the image itself, exactly."""
    if float(t) == 0.0:
        return x_known
    return add_noise(x_known, t, schedule, generator=g)[0]


def inpaint(
    model: Model,
    x_known: Tensor,
    mask: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    resample: int = 1,
    jump: int = 1,
    eta: float = 1.0,
    prediction: str = "x0",
    noise: Tensor | None = None,
    generator: torch.Generator | int | None = None,
    return_trajectory: bool = False,
) -> Tensor:
    r"""Fill the entries where ``mask`` is ``False`` so that the result agrees with ``x_known`` where it is ``True``.

    RePaint's loop (Lugmayr et al. 2022, Algorithm 1) over the grid ``ts`` ($t_0 > \dots > t_n = 0$)
    and the walk of {func}`repaint_levels` (``jump``, ``resample``):

    1. start from $x = m\odot(\alpha(t_0)x^{\rm known} + \sigma(t_0)\varepsilon') + (1-m)\odot\sigma(t_0)z$,
       $z$ = ``noise`` (the unknown part starts as the samplers' pure noise);
    2. a step down from $t$ to $s$: one DDIM step with stochasticity ``eta``
       ({func}`stepdiff.samplers.ddim_coefficients`; $\eta = 1$ is DDPM's ancestral step, RePaint's
       choice), then the known region is replaced by $\alpha(s)x^{\rm known} + \sigma(s)\varepsilon'$
       with fresh $\varepsilon'$, and by $x^{\rm known}$ itself at $s = 0$;
    3. a step up from $t$ to $s > t$ (resampling): the forward transition
       $x_s = \frac{\alpha_s}{\alpha_t}x_t + \sqrt{\sigma_s^2 - \frac{\alpha_s^2}{\alpha_t^2}\sigma_t^2}\,\eta$
       of the whole image ({func}`stepdiff.forward.transition`).

    ``resample = 1`` is the plain replacement method. The known region of the result is
    ``x_known`` bit for bit; at every step down it is the noised known image, whatever the
    model returns. ``mask``: see {func}`check_mask` (``True`` = known). ``x_known``: ``[B, ...]``
    (its unknown entries are never read). All randomness comes from ``generator``.
    ``return_trajectory``: also the states after every step, stacked ``[steps + 1, B, ...]``.
    """
    _check_batch(x_known, "x_known")
    m = check_mask(mask, x_known)
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta >= 0):
        raise ValueError(f"eta must be a number >= 0; got {eta!r}")
    ts = torch.as_tensor(ts).to(f64)
    if ts.ndim != 1 or ts.numel() < 2 or bool((ts[1:] >= ts[:-1]).any()) or float(ts[-1]) != 0.0:
        raise ValueError(f"ts must be a strictly decreasing 1-D grid ending at t = 0; got {ts.tolist()}")
    if bool((ts < 0).any()) or bool((ts > 1).any()):
        raise ValueError(f"ts must lie in [0, 1]; got [{float(ts.min())}, {float(ts.max())}]")
    n = ts.numel() - 1
    walk = repaint_levels(n, jump, resample)
    g = _generator(generator, x_known.device)
    if noise is None:
        noise = torch.randn(x_known.shape, generator=g, device=x_known.device, dtype=x_known.dtype)
    elif not isinstance(noise, Tensor) or noise.shape != x_known.shape:
        shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must have the shape of x_known {tuple(x_known.shape)}; got {shape}")

    def time(level: int) -> Tensor:
        return ts[n - level]

    cdtype = f64 if x_known.dtype == f64 else torch.float32
    x = torch.where(m, _noised(x_known, ts[0], schedule, g), float(schedule.sigma(ts[0])) * noise)
    trajectory = [x] if return_trajectory else None
    for a, b in zip(walk[:-1], walk[1:]):
        t, s = time(a), time(b)
        if b < a:
            # Coefficients as tensors: affine_step would round a Python float to float32.
            c_x, c_x0, c_noise = (c.to(cdtype) for c in ddim_coefficients(schedule, t, s, float(eta)))
            x0_hat = _x0_hat(model, x, t, schedule, prediction)
            x = affine_step(x, x0_hat, c_x, c_x0, c_noise if float(c_noise) > 0 else None, generator=g)
            x = torch.where(m, _noised(x_known, s, schedule, g), x)
        else:
            x = transition(x, t, s, schedule, generator=g)
        if trajectory is not None:
            trajectory.append(x)
    return torch.stack(trajectory) if trajectory is not None else x


# --- a model trained with the mask as input ----------------------------------------------------


class MaskedInputDenoiser(nn.Module):
    r"""A denoiser that also sees the mask and the known image: $f([x_t,\ m\odot x^{\rm known},\ m], t)$.

    ``net`` is any image denoiser with $2C + 1$ input channels (e.g.
    ``UNet(UNetConfig.preset("tiny", in_channels=2 * C + 1))``) called as ``net(x, t, y, context,
    context_mask)``; its first $C$ output channels are the prediction (the UNet returns as many
    channels as it takes; the other $C + 1$ are unused and, never in a loss, get no gradient).
    Stable Diffusion's inpainting model feeds its UNet the same concatenation.

    ``forward(x, t, y=None, context=None, context_mask=None, *, known, mask)``: ``x`` ``[B, C, H, W]``,
    ``known`` like ``x`` (only its entries under the mask are read), ``mask`` as in
    {func}`check_mask` with one channel or $C$ (``True`` = known). {meth}`bind` closes over a
    known image and mask so that a sampler can call ``model(x, t)``.
    """

    def __init__(self, net: nn.Module, channels: int) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer; got {channels!r}")
        expected = getattr(getattr(net, "config", None), "in_channels", None)
        if expected is not None and expected != 2 * channels + 1:
            raise ValueError(
                f"net takes {expected} input channels; a masked-input denoiser of {channels}-channel images "
                f"needs 2 * {channels} + 1 = {2 * channels + 1} (x_t, the masked image, the mask)"
            )
        self.net = net
        self.channels = channels

    @property
    def null_class(self) -> int | None:
        return getattr(self.net, "null_class", None)

    def inputs(self, x: Tensor, known: Tensor, mask: Tensor) -> Tensor:
        """The network's input $[x_t,\\ m\\odot x^{\\rm known},\\ m]$ along the channels."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be [B, {self.channels}, H, W]; got {tuple(x.shape)}")
        if not isinstance(known, Tensor) or known.shape != x.shape:
            shape = tuple(known.shape) if isinstance(known, Tensor) else type(known).__name__
            raise ValueError(f"known must have the shape of x {tuple(x.shape)}; got {shape}")
        m = check_mask(mask, x)
        if m.shape[1] != 1 and m.shape[1] != self.channels:
            raise ValueError(f"mask must have 1 or {self.channels} channels; got shape {tuple(mask.shape)}")
        m = m.expand(x.shape[0], -1, *x.shape[2:]).to(x.dtype)
        m1 = m[:, :1] if m.shape[1] == 1 else m.amax(1, keepdim=True)
        if m.shape[1] != 1 and not torch.equal(m, m1.expand_as(m)):
            raise ValueError("mask must mark whole pixels (the same in every channel) for a masked-input denoiser")
        return torch.cat([x, m1 * known.to(x.dtype), m1], dim=1)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, *, known: Tensor, mask: Tensor) -> Tensor:
        h = self.inputs(x, known, mask)
        kwargs = {k: v for k, v in (("y", y), ("context", context), ("context_mask", context_mask)) if v is not None}
        return self.net(h, t, **kwargs)[:, : self.channels]

    def bind(self, known: Tensor, mask: Tensor, **kwargs) -> Callable[[Tensor, Tensor], Tensor]:
        """``model(x, t)`` with the known image, the mask (and ``y``, ``context``, ...) fixed."""

        def bound(x: Tensor, t: Tensor) -> Tensor:
            return self(x, t, known=known, mask=mask, **kwargs)

        return bound


def random_box_masks(
    batch: int, height: int, width: int, *, min_frac: float = 0.25, max_frac: float = 0.6,
    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
) -> Tensor:
    r"""Masks ``[B, 1, H, W]`` (bool, ``True`` = known) with one unknown axis-aligned box each.

    The box's height is $h = \mathrm{round}(H u)$ with $u \sim U[f_{\min}, f_{\max}]$ (``min_frac``,
    ``max_frac``), its width likewise, and its top-left corner uniform among the
    $(H - h + 1)(W - w + 1)$ positions that fit.
    """
    if not 0 < min_frac <= max_frac <= 1:
        raise ValueError(f"need 0 < min_frac <= max_frac <= 1; got {min_frac}, {max_frac}")
    u = torch.rand(batch, 4, generator=generator, device=device)
    hs = (height * (min_frac + (max_frac - min_frac) * u[:, 0])).round().clamp(1, height).long()
    ws = (width * (min_frac + (max_frac - min_frac) * u[:, 1])).round().clamp(1, width).long()
    top = ((height - hs + 1) * u[:, 2]).floor().long().clamp(max=height - 1)
    left = ((width - ws + 1) * u[:, 3]).floor().long().clamp(max=width - 1)
    rows = torch.arange(height, device=device)[None, :]
    cols = torch.arange(width, device=device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + hs)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ws)[:, None])
    box = in_rows[:, :, None] & in_cols[:, None, :]
    return ~box[:, None]


def masked_diffusion_loss(
    model: MaskedInputDenoiser,
    x0: Tensor,
    schedule: Schedule,
    *,
    prediction: str = "eps",
    mask: Tensor | None = None,
    empty_fraction: float = 0.1,
    weighting: Callable[[Tensor], Tensor] | None = None,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> Tensor:
    r"""The denoising loss of a {class}`MaskedInputDenoiser`, on random masks.

    $$L = \mathbb E\big[\tfrac1D\|f_\theta([x_t, m\odot x_0, m], t) - (A_tx_0 + B_t\varepsilon)\|^2\big],$$

    the regression of {func}`stepdiff.train.diffusion_loss` with the model given the known part
    of its own clean image. ``mask`` ``[B, 1, H, W]``: by default {func}`random_box_masks`, with a
    fraction ``empty_fraction`` of the batch entirely unknown (so the model also learns to
    generate with nothing known). ``weighting``: $w(t)$ as in {func}`stepdiff.train.diffusion_loss`.
    Returns a scalar; train it with ``train(model, images, loss_fn=masked_loss_fn(schedule))``.
    """
    from .train import diffusion_loss

    _check_batch(x0, "x0")
    if x0.ndim != 4:
        raise ValueError(f"x0 must be an image batch [B, C, H, W]; got {tuple(x0.shape)}")
    if not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"empty_fraction must lie in [0, 1]; got {empty_fraction}")
    B, _, H, W = x0.shape
    if mask is None:
        mask = random_box_masks(B, H, W, generator=generator, device=x0.device)
        empty = torch.rand(B, generator=generator, device=x0.device) < empty_fraction
        mask = mask & ~empty[:, None, None, None]
    m = check_mask(mask, x0)

    def denoiser(x: Tensor, t: Tensor, *label: Tensor) -> Tensor:
        return model(x, t, *label, known=x0, mask=m)

    return diffusion_loss(denoiser, x0, schedule, prediction=prediction, weighting=weighting, y=y,
                          generator=generator, t_min=t_min, t_max=t_max)


def masked_loss_fn(schedule: Schedule, *, prediction: str = "eps", weighting: Callable[[Tensor], Tensor] | None = None,
                   t_min: float = 0.0, t_max: float = 1.0) -> Callable:
    r"""{func}`masked_diffusion_loss` as a ``loss_fn(model, x0, y, generator)`` for {func}`stepdiff.train.train`:
    $\mathbb E\,w(t)\tfrac1D\|f_\theta([x_t, m\odot x_0, m], t) - (A_tx_0 + B_t\varepsilon)\|^2$ on random masks."""

    def loss_fn(model: MaskedInputDenoiser, x0: Tensor, y: Tensor | None, generator: torch.Generator) -> Tensor:
        return masked_diffusion_loss(model, x0, schedule, prediction=prediction, weighting=weighting, y=y,
                                     generator=generator, t_min=t_min, t_max=t_max)

    return loss_fn


def inpaint_with_model(
    model: MaskedInputDenoiser,
    x_known: Tensor,
    mask: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    sampler: str | Callable = "ddim",
    prediction: str = "eps",
    noise: Tensor | None = None,
    generator: torch.Generator | int | None = None,
    **sampler_kwargs,
) -> Tensor:
    r"""Inpaint with a {class}`MaskedInputDenoiser`: sample from noise with the model told the
    known image and the mask, then paste the known region back, $\hat x \leftarrow m\odot x^{\rm known}
    + (1 - m)\odot\hat x$ (so it is exact). ``sampler`` as in {func}`sdedit`; the start is
    $\sigma(t_0)z$, $z$ = ``noise``."""
    _check_batch(x_known, "x_known")
    m = check_mask(mask, x_known)
    fn = _sampler(sampler)
    g = _generator(generator, x_known.device)
    ts = torch.as_tensor(ts).to(f64)
    if noise is None:
        noise = torch.randn(x_known.shape, generator=g, device=x_known.device, dtype=x_known.dtype)
    if "generator" not in sampler_kwargs and "generator" in inspect.signature(fn).parameters:
        sampler_kwargs["generator"] = g
    x = float(schedule.sigma(ts[0])) * noise
    out = fn(model.bind(x_known, m), x, schedule, ts, prediction=prediction, **sampler_kwargs)
    return torch.where(m, x_known, out)

