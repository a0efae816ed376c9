r"""Gradient ascent on an input: "optimise the noise until the model agrees", the opening failure.

Given a differentiable score $f(x)$ of an image batch (a classifier's log-probability of a class,
a CLIP model's similarity to a prompt), {func}`ascend` starts from an image $x_0$ (usually
Gaussian noise, the marble block) and climbs the score by projected gradient ascent in the box
of valid pixels $B = [-1, 1]^d$:

$$x_{k+1} = \Pi_B\big(x_k + \eta\, g_k\big), \qquad g_k = \nabla_x f(x_k)\ \text{(plain)}\quad\text{or}\quad
g_k = \frac{\nabla_x f(x_k)}{\operatorname{rms}\nabla_x f(x_k)}\ \text{(normalised)},$$

where $\Pi_B$ clamps every pixel to $[-1, 1]$ and $\operatorname{rms}$ is the root mean square
over one image's pixels. With ``normalize=True`` every image moves by $\eta$ per pixel (in RMS)
at each step whatever the scale of its gradient, the usual choice for an attack, since a
confident classifier's gradient vanishes as its probability saturates. With plain steps and
$\eta \le 1/L$ for a score whose gradient is $L$-Lipschitz, each step cannot lower the score
(the projected-gradient ascent lemma), which ``tests/test_attacks.py`` checks on fixed models.

The score is computed per image, so the images of a batch do not interact: the ascent of image
$i$ is the same alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AscentResult", "ascend"]


@dataclass
class AscentResult:
    """What {func}`ascend` returns.

    ``images`` the final images ``[B, ...]`` in $[-1, 1]$ (detached); ``scores`` ``[steps + 1, B]``,
    the score of every image before the first step and after each step (so ``scores[0]`` is the
    start and ``scores[-1]`` the end).
    """

    images: Tensor
    scores: Tensor


def _positive(name: str, value, kind: type) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok or not value > 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}; got {value!r}")


def ascend(
    score: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    steps: int = 100,
    lr: float = 0.05,
    normalize: bool = True,
    bounds: tuple[float, float] = (-1.0, 1.0),
    stop_at: float | None = None,
) -> AscentResult:
    r"""Projected gradient ascent of ``score`` from ``x0``: $x_{k+1} = \Pi_B(x_k + \eta\,g_k)$ (module docstring).

    - ``score``: a function of an image batch ``[B, ...]`` returning one number per image ``[B]``,
      differentiable in its input (e.g. ``lambda x: classifier(x).log_softmax(1)[:, c]``);
      the model's own parameters are not changed and get no gradient.
    - ``x0``: the starting images ``[B, ...]`` (float); they are first clamped into ``bounds``.
    - ``steps``: the number of ascent steps $K$; ``lr``: the step $\eta$ (per pixel, in RMS, when
      ``normalize``); ``normalize``: divide each image's gradient by its RMS over the pixels.
    - ``bounds``: the pixel box $[lo, hi]$ every iterate is clamped to.
    - ``stop_at``: when given, an image whose score has reached $f(x_k) \ge$ ``stop_at`` is not
      moved again, so each image changes only as much as it needs to reach that score (for a
      deterministic ``score`` it then keeps it).

    Returns an {class}`AscentResult` (the final images and the score after every step). Raises
    ``ValueError`` naming the argument for a bad ``steps``, ``lr``, ``bounds``, ``stop_at`` or ``x0``, or for a
    ``score`` that does not return one finite number per image.
    """
    if not isinstance(x0, Tensor) or x0.ndim < 2 or not x0.is_floating_point() or x0.shape[0] < 1:
        desc = f"{x0.dtype} {tuple(x0.shape)}" if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a float batch [B, ...] of at least one image; got {desc}")
    if not callable(score):
        raise ValueError(f"score must be a function of an image batch; got {type(score).__name__}")
    _positive("steps", steps, int)
    _positive("lr", lr, float)
    if (
        not isinstance(bounds, (tuple, list))
        or len(bounds) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
        or not bounds[0] < bounds[1]
    ):
        raise ValueError(f"bounds must be two numbers (lo, hi) with lo < hi; got {bounds!r}")
    lo, hi = float(bounds[0]), float(bounds[1])
    if stop_at is not None and (
        isinstance(stop_at, bool) or not isinstance(stop_at, (int, float)) or not abs(float(stop_at)) < float("inf")
    ):
        raise ValueError(f"stop_at must be a finite number or None; got {stop_at!r}")
    B = x0.shape[0]

    def evaluate(x: Tensor) -> Tensor:
        s = score(x)
        if not isinstance(s, Tensor) or s.shape != (B,):
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"score must return one number per image, a tensor [{B}]; got {shape}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError("score returned NaN or infinite values")
        return s

    x = x0.detach().clamp(lo, hi)
    history = []
    for _ in range(steps):
        x.requires_grad_(True)
        s = evaluate(x)
        # Per-image scores summed: the gradient of image i is that of its own score only.
        (g,) = torch.autograd.grad(s.sum(), x)
        history.append(s.detach())
        with torch.no_grad():
            if normalize:
                rms = g.pow(2).flatten(1).mean(1).sqrt().clamp(min=1e-12)
                g = g / rms.view(B, *([1] * (g.ndim - 1)))
            if stop_at is not None:
                # images that already reach the goal stay where they are
                g = g * (s.detach() < stop_at).to(g.dtype).view(B, *([1] * (g.ndim - 1)))
            x = (x + lr * g).clamp(lo, hi)
    with torch.no_grad():
        history.append(evaluate(x).detach())
    return AscentResult(images=x.detach(), scores=torch.stack(history))
