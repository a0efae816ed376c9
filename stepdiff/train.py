r"""Training: the regression losses of diffusion and flow matching, EMA, checkpoints, one loop.

Every loss here is a least-squares regression, so the optimal network predicts a conditional
expectation given the noisy input. The losses:

- {func}`diffusion_loss`: draw $t$, form $x_t = \alpha(t)x_0 + \sigma(t)\varepsilon$ and regress
  the network on the target of its parametrization ($\varepsilon$, $x_0$, $v$, the score or the
  velocity, {mod}`stepdiff.parametrize`), with an optional weight $w(t)$. This covers the
  tutorial's Pseudocode 6 ($x_0$-prediction on its VE process) and Pseudocode 4 (flow
  matching: {class}`~stepdiff.schedules.FlowMatchingSchedule` with ``prediction="velocity"``).
- {func}`tutorial_ddpm_loss`: the tutorial's Pseudocode 1, which regresses
  $x_{t}$ on $x_{t+\Delta t}$, so the network learns one reverse step $\mathbb E[x_{t-\Delta t}\mid x_t]$.
- {func}`min_snr_weighting`: the Min-SNR-$\gamma$ weight (Hang et al. 2023) for any
  parametrization.

{func}`train` is a plain loop (Adam, gradient clipping, {class}`EMA`) whose randomness is a
function of ``(seed, step)`` alone, so a run stopped at a checkpoint and resumed gives the
same weights, bit for bit, as a run that never stopped.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .forward import add_noise, transition
from .parametrize import PREDICTIONS, conversion_coefficients, target_coefficients
from .schedules import Schedule, check_time

__all__ = [
    "diffusion_loss",
    "tutorial_ddpm_loss",
    "min_snr_weighting",
    "EMA",
    "TrainResult",
    "train",
    "save_checkpoint",
    "load_checkpoint",
    "derive_seed",
    "learning_rate",
    "LR_DECAYS",
]

Weighting = Callable[[Tensor], Tensor]
LossFn = Callable[[nn.Module, Tensor, "Tensor | None", torch.Generator], Tensor]


# --- losses -----------------------------------------------------------------------------------


def _check_batch(x0: Tensor) -> None:
    if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.ndim < 2 or x0.shape[0] < 1:
        shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a floating-point batch of shape [B, ...] with B >= 1; got {shape}")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def _call(model: Callable, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
    """``model(x, t[, y])``, checked to return the shape of ``x``."""
    out = model(x, t) if y is None else model(x, t, y)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model returned {shape} for an input of shape {tuple(x.shape)}; it must match")
    return out


def _draw_times(
    x0: Tensor, t: Tensor | float | None, lo: float, hi: float, generator: torch.Generator | None
) -> Tensor:
    """Per-sample times ``[B]`` (float64): ``t`` checked and broadcast, or $U[lo, hi]$ draws."""
    B = x0.shape[0]
    if t is None:
        u = torch.rand(B, generator=generator, device=x0.device, dtype=torch.float64)
        return lo + (hi - lo) * u
    t = check_time(t).to(device=x0.device, dtype=torch.float64)
    if t.ndim == 0:
        return t.expand(B)
    if t.shape != (B,):
        raise ValueError(
            f"t must be a scalar or have one entry per sample, shape [{B}]; got {tuple(t.shape)} "
            f"for x0 of shape {tuple(x0.shape)}"
        )
    return t


def _per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    r"""$\frac1D\|p - \text{target}\|^2$ for each sample: ``[B]``."""
    return (pred - target).pow(2).reshape(pred.shape[0], -1).mean(1)


def _weighted_mean(per_sample: Tensor, t: Tensor, weighting: Weighting | None) -> Tensor:
    if weighting is None:
        return per_sample.mean()
    w = torch.as_tensor(weighting(t), device=per_sample.device)
    if w.ndim > 1 or (w.ndim == 1 and w.shape != per_sample.shape):
        raise ValueError(f"weighting(t) must return a scalar or shape [{per_sample.shape[0]}]; got {tuple(w.shape)}")
    return (w.to(per_sample.dtype) * per_sample).mean()


def diffusion_loss(
    model: Callable[..., Tensor],
    x0: Tensor,
    schedule: Schedule,
    *,
    prediction: str = "eps",
    t: Tensor | float | None = None,
    t_min: float = 0.0,
    t_max: float = 1.0,
    weighting: Weighting | None = None,
    noise: Tensor | None = None,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The denoising regression loss for any parametrization:

    $$L(\theta) = \mathbb E_{t, x_0, \varepsilon}\Big[w(t)\,\tfrac1D\big\|f_\theta(x_t, t) -
    (A_t x_0 + B_t\varepsilon)\big\|^2\Big],\qquad x_t = \alpha(t)x_0 + \sigma(t)\varepsilon,$$

    with $(A_t, B_t)$ the target coefficients of ``prediction``
    ({func}`~stepdiff.parametrize.target_coefficients`: ``"eps"`` $(0, 1)$, ``"x0"`` $(1, 0)$,
    ``"v"`` $(-\sigma, \alpha)$, ``"score"`` $(0, -1/\sigma)$, ``"velocity"`` $(\dot\alpha,
    \dot\sigma)$), $D$ the number of entries of one sample (a mean, not a sum, so the value
    does not grow with the dimension), and $w$ = ``weighting`` (a function of ``t`` ``[B]``,
    float64, returning ``[B]`` or a scalar; none means $w = 1$). The minimiser is
    $f^*(x, t) = \mathbb E[A_t x_0 + B_t\varepsilon \mid x_t = x]$.

    ``t``: a scalar or per-sample ``[B]`` in $[0, 1]$, or by default $t \sim U[t_{\min}, t_{\max}]$
    per sample. $\varepsilon \sim \mathcal N(0, I)$ unless ``noise`` is given (any base sample
    of the shape of ``x0``). ``y``: labels passed on as ``model(x_t, t, y)``.
    ``x0``: ``[B, ...]``; the model sees ``x_t`` of that shape and ``t`` ``[B]`` in the dtype of
    ``x0``. Returns a scalar. The noising goes through {func}`stepdiff.forward.add_noise`
    (one fused kernel on CUDA).

    The tutorial's regressions are instances:

    - Pseudocode 6 ($x_0$-prediction, "variance-reduced" DDPM):
      ``schedule=VESchedule(sigma_q)``, ``prediction="x0"``: $\|g_\theta(x_t, t) - x_0\|^2$
      with $x_t = x_0 + \mathcal N(0, \sigma_q^2 t)$, $t \sim U[0, 1]$.
    - Pseudocode 4 (flow matching, linear pointwise flows, independent coupling):
      ``schedule=FlowMatchingSchedule()``, ``prediction="velocity"``, $x_1$ = ``noise``
      (Gaussian by default, or e.g. an {func}`~stepdiff.data.annulus` sample):
      $x_t = (1-t)x_0 + t x_1$ and the target is $dx_t/dt = x_1 - x_0$. The tutorial's target
      is $x_0 - x_1$, the same field with its sign convention $dx_t/dt = -v_t$ (the tutorial's (T59));
      our samplers integrate $dx/dt$ directly, so a network trained here is used with
      ``prediction="velocity"`` as it is.
    """
    _check_batch(x0)
    _check_prediction(prediction)
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1; got t_min={t_min}, t_max={t_max}")
    if t is None:
        ends = torch.tensor([t_min, t_max], dtype=torch.float64)
        A, B = target_coefficients(schedule, ends, prediction)
        if not bool(torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(
                f"the {prediction!r} target of {schedule!r} is infinite at t in {{{t_min}, {t_max}}}; "
                "sample t from a smaller range (t_min > 0 or t_max < 1)"
            )
    t = _draw_times(x0, t, t_min, t_max, generator)
    x_t, target = add_noise(x0, t, schedule, prediction=prediction, noise=noise, generator=generator)
    pred = _call(model, x_t, t.to(x0.dtype), y)
    return _weighted_mean(_per_sample_mse(pred, target), t, weighting)


def tutorial_ddpm_loss(
    model: Callable[..., Tensor],
    x0: Tensor,
    schedule: Schedule,
    dt: float,
    *,
    t: Tensor | float | None = None,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The tutorial's Pseudocode 1: learn one reverse step, $f_\theta(x, s) \approx \mathbb E[x_{s-\Delta t}\mid x_s]$.

    $$x_t = x_0 + \mathcal N(0, \sigma_q^2 t),\qquad x_{t+\Delta t} = x_t + \mathcal N(0, \sigma_q^2\Delta t),
    \qquad L = \tfrac1D\big\|f_\theta(x_{t+\Delta t},\ t + \Delta t) - x_t\big\|^2,$$

    averaged over the batch. The step is {func}`stepdiff.forward.transition`, so on another
    schedule it is that schedule's Markov step; the tutorial's case is
    {class}`~stepdiff.schedules.VESchedule`. The network is then the "mean" predictor of
    ``sample_ddpm_tutorial(..., prediction="mean")`` and ``sample_ddim_tutorial(...,
    prediction="mean")``, on the uniform grid with the same $\Delta t$ = ``dt`` (1/steps).

    One change from the printed box: $t \sim U[0, 1 - \Delta t]$ rather than $U[0, 1]$, so the
    network is trained at exactly the input times $s = t + \Delta t \in [\Delta t, 1]$ at which
    the sampler asks it, never at $s > 1$ outside the process. ``t``, if given, is that
    earlier time (scalar or ``[B]``, in $[0, 1-\Delta t]$). Returns a scalar.
    """
    _check_batch(x0)
    if not 0.0 < dt < 1.0:
        raise ValueError(f"dt must lie in (0, 1); got {dt}")
    if t is not None:
        t_checked = check_time(t)
        if t_checked.numel() and float(t_checked.max()) > 1.0 - dt:
            raise ValueError(f"t must lie in [0, 1 - dt] = [0, {1.0 - dt:.6g}]; got {float(t_checked.max()):.6g}")
    t = _draw_times(x0, t, 0.0, 1.0 - dt, generator)
    s = (t + dt).clamp(max=1.0)
    x_t, _ = add_noise(x0, t, schedule, prediction="x0", generator=generator)
    x_s = transition(x_t, t, s, schedule, generator=generator)
    pred = _call(model, x_s, s.to(x0.dtype), y)
    return _per_sample_mse(pred, x_t).mean()


def min_snr_weighting(schedule: Schedule, prediction: str = "eps", gamma: float = 5.0) -> Weighting:
    r"""Min-SNR-$\gamma$ (Hang et al. 2023) as a weight for the loss of any parametrization.

    Min-SNR weights the $x_0$ loss by $\min(\mathrm{SNR}(t), \gamma)$. A prediction $p$ relates
    to $x_0$ by $\hat x_0 = a\,x_t + b\,\hat p$ ({func}`~stepdiff.parametrize.conversion_coefficients`),
    so its error is $1/b$ times the $x_0$ error and the same objective reads

    $$w(t) = \min(\mathrm{SNR}(t), \gamma)\; b(t)^2,$$

    which gives $\min(\mathrm{SNR},\gamma)/\mathrm{SNR}$ for $\varepsilon$ and, on a
    variance-preserving schedule, $\min(\mathrm{SNR},\gamma)/(\mathrm{SNR}+1)$ for $v$ (the
    forms in diffusers' examples). Returns a function of ``t`` ``[B]`` giving ``[B]``.
    """
    _check_prediction(prediction)
    if not gamma > 0:
        raise ValueError(f"gamma must be positive; got {gamma}")

    def weight(t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        _, b = conversion_coefficients(schedule, t, prediction, "x0")
        return schedule.snr(t).clamp(max=gamma) * b**2

    return weight


# --- EMA and checkpoints ----------------------------------------------------------------------


class EMA:
    r"""An exponential moving average of a model's weights, kept in a frozen copy ``self.model``.

    After each optimiser step, $\bar\theta \leftarrow \beta_k\bar\theta + (1 - \beta_k)\theta$ with
    $\beta_k = \min\big(\beta, \frac{1 + k}{10 + k}\big)$ at the $k$-th update (the warm-up
    keeps the average from remembering the random initial weights for long; ``warmup=False``
    uses $\beta$ throughout). Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1); got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """$\\beta_k$ for the next update."""
        k = self.num_updates + 1
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` into the average."""
        beta = self.current_decay()
        for avg, p in zip(self.model.parameters(), model.parameters(), strict=True):
            avg.lerp_(p.detach(), 1.0 - beta)
        for avg, b in zip(self.model.buffers(), model.buffers(), strict=True):
            avg.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    step: int,
    losses: list[float],
    settings: dict,
    *,
    metadata: dict | None = None,
    elapsed: dict | None = None,
) -> None:
    """Write everything a run needs to continue exactly; the file is replaced atomically.

    ``metadata``: anything JSON-like to keep with the weights (the command's provenance record);
    ``elapsed``: ``{"wall_s", "cpu_s"}`` spent on the run so far. A failed write leaves the old
    file (or none) and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": None if ema is None else ema.state_dict(),
        "step": int(step),
        "losses": torch.tensor(losses, dtype=torch.float64),
        "settings": dict(settings),
        "metadata": None if metadata is None else dict(metadata),
        "elapsed": {"wall_s": 0.0, "cpu_s": 0.0} if elapsed is None else dict(elapsed),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: EMA | None = None,
) -> dict:
    """Restore ``model`` (and ``optimizer``, ``ema`` when given) from {func}`save_checkpoint`'s file.

    Returns the stored dictionary (``step``, ``losses``, ``settings``, ``metadata``, ``elapsed``, ...).
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file when its
    weights do not fit ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError(f"{path} is not a training checkpoint (written by stepdiff.train.save_checkpoint)")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"the checkpoint {path} does not match the model: {err}") from None
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        if state["ema"] is None:
            raise ValueError(f"{path} holds no EMA weights")
        ema.load_state_dict(state["ema"])
    state.setdefault("metadata", None)
    state.setdefault("elapsed", {"wall_s": 0.0, "cpu_s": 0.0})
    return state


# --- the training loop ------------------------------------------------------------------------

_DATA, _NOISE = 0, 1  # stream ids for derive_seed
LR_DECAYS = ("constant", "cosine")


def derive_seed(seed: int, stream: int, index: int, *more: int) -> int:
    """An independent 63-bit seed for item ``index`` (and sub-items ``more``) of random ``stream``
    (NumPy's ``SeedSequence``)."""
    entropy = [int(seed), int(stream), int(index), *(int(m) for m in more)]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def _noise_seed(seed: int, step: int, micro: int) -> int:
    """The seed of micro-batch ``micro`` of step ``step`` (micro-batch 0: the seed of a run
    without micro-batches, so splitting a batch changes nothing for its first part)."""
    return derive_seed(seed, _NOISE, step) if micro == 0 else derive_seed(seed, _NOISE, step, micro)


def learning_rate(step: int, lr: float, steps: int, warmup: int = 0, decay: str = "constant") -> float:
    r"""The learning rate of step $k$ (0-based): a linear warm-up over the first $W$ steps, then
    constant or a cosine decay that reaches 0 at the end of the run ($k = K$),

    $$\eta_k = \eta\,\min\Big(1, \frac{k + 1}{W}\Big)\,c_k,\qquad
    c_k = \tfrac12\Big(1 + \cos\frac{\pi\,\max(k - W, 0)}{\max(K - W, 1)}\Big)\ \text{(cosine) or } 1,$$

    with $K$ = ``steps``. A pure function of the step, so a resumed run gets the same rates.
    """
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if decay == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * max(step - warmup, 0) / max(steps - warmup, 1)))
    return lr * factor


def _distributed() -> tuple[int, int]:
    """``(world_size, rank)`` of the running ``torch.distributed`` group, or ``(1, 0)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@dataclass
class TrainResult:
    """What {func}`train` returns: the trained model, its EMA, the optimiser, the loss per step,
    and the time spent (wall and CPU seconds of this process, summed over resumed parts)."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)
    step: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0


def train(
    model: nn.Module,
    data: Tensor,
    schedule: Schedule | None = None,
    *,
    prediction: str = "eps",
    weighting: Weighting | None = None,
    loss_fn: LossFn | None = None,
    labels: Tensor | None = None,
    label_dropout: float = 0.0,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    lr_warmup: int = 0,
    lr_decay: str = "constant",
    grad_clip: float | None = 1.0,
    ema_decay: float = 0.999,
    seed: int = 0,
    micro_batches: int = 1,
    autocast: torch.dtype | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: str | Path | None = None,
    metadata: dict | None = None,
    callback: Callable[[int, float], None] | None = None,
    stop_after: int | None = None,
    progress: bool = False,
) -> TrainResult:
    r"""Train ``model`` on ``data`` ``[N, ...]`` for ``steps`` optimiser steps in total.

    Each step $k$:

    1. the batch: epoch $e = \lfloor k / S\rfloor$ with $S = \lfloor N/b\rfloor$ steps per epoch
       ($b$ = ``batch_size``, at most $N$) shuffles the data by a permutation seeded from
       ``(seed, e)``, and step $k$ takes its $(k \bmod S)$-th slice of $b$ indices;
    2. the noise: a generator seeded from ``(seed, k)`` draws $t$, $\varepsilon$ and the label
       dropout, so nothing random depends on what ran before;
    3. the loss, by default {func}`diffusion_loss` with ``schedule``, ``prediction`` and
       ``weighting``; or ``loss_fn(model, x0, y, generator)`` (e.g. a
       {func}`tutorial_ddpm_loss` with its ``dt``, or a flow-matching loss from an annulus);
    4. Adam (learning rate {func}`learning_rate` of ``lr``, ``lr_warmup``, ``lr_decay``),
       gradient norm clipped to ``grad_clip``, then the {class}`EMA` update with decay ``ema_decay``.

    **Conditioning.** With ``labels`` the model is called as ``model(x, t, y)``: class ids ``[N]``,
    or token rows ``[N, L]`` (captions, for a {class}`~stepdiff.models.text.TextConditioned` model).
    ``label_dropout`` $p$ replaces each label by ``model.null_class`` with probability $p$
    (classifier-free guidance training); a dropped token row becomes a row of ``null_class``
    (the padding id), which the text-conditioned model reads as the empty caption.

    **Micro-batches and data parallelism.** The batch of step $k$ (the *global* batch, $b$ rows)
    is cut into ``micro_batches`` equal parts; part $m$ draws its noise from a generator seeded
    from ``(seed, k, m)`` (part 0 from ``(seed, k)``, as above), and the step's gradient is the
    mean of the parts' gradients. Under ``torch.distributed`` (e.g. ``torchrun``) with $W$
    processes, ``micro_batches`` must be a multiple of $W$ and process $r$ computes parts
    $rM/W, \dots, (r+1)M/W - 1$ (its shard of the data); the model is wrapped in
    ``DistributedDataParallel``, which averages the gradients. So a run depends on
    ``(seed, batch_size, micro_batches)`` and not on how many processes share it, up to the
    order of floating-point sums. Checkpoints and ``callback`` are on rank 0 only; the logged loss
    is the mean over the global batch.

    ``autocast``: a dtype (``torch.bfloat16``) to run the loss under ``torch.autocast`` on the
    model's device (weights, optimiser and EMA stay in float32). ``checkpoint``: a file written
    every ``checkpoint_every`` steps and at the end, with ``metadata`` (any JSON-like dict) and
    the time spent; ``resume``: such a file to continue from (the run's settings must match).
    Because steps depend only on ``(seed, k)`` and the stored state, stopping and resuming
    gives bit-identical weights. ``callback(k, loss)`` is called after step $k$. ``stop_after``:
    stop once this many steps are done (the run, and its learning-rate schedule, still span
    ``steps``; resume it later). ``progress`` shows a tqdm bar.
    """
    _check_batch(data)
    N = data.shape[0]
    custom_loss = loss_fn is not None
    if loss_fn is None:
        if schedule is None:
            raise ValueError("pass the schedule (or a loss_fn)")
        _check_prediction(prediction)
        loss_fn = _default_loss(schedule, prediction, weighting)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("micro_batches", micro_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive integer; got {stop_after!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive integer; got {checkpoint_every!r}")
    if isinstance(lr_warmup, bool) or not isinstance(lr_warmup, int) or lr_warmup < 0:
        raise ValueError(f"lr_warmup must be a non-negative integer; got {lr_warmup!r}")
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"unknown lr_decay {lr_decay!r}; choose one of {LR_DECAYS}")
    if not lr > 0:
        raise ValueError(f"lr must be positive; got {lr}")
    if labels is not None and (labels.ndim not in (1, 2) or labels.shape[0] != N or labels.is_floating_point()):
        raise ValueError(
            f"labels must be integer class ids [{N}] or token rows [{N}, L] (one per data point); "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must lie in [0, 1]; got {label_dropout}")
    null_class = getattr(model, "null_class", None)
    if label_dropout > 0 and (labels is None or null_class is None):
        raise ValueError("label_dropout needs labels and a model with a null_class (n_classes > 0)")
    world, rank = _distributed()
    b = min(batch_size, N)
    if micro_batches % world or b % micro_batches:
        raise ValueError(
            f"micro_batches ({micro_batches}) must be a multiple of the number of processes ({world}) and "
            f"divide the batch ({b})"
        )

    device = next(model.parameters()).device
    per_epoch = N // b
    settings = {
        "seed": seed,
        "batch_size": b,
        "micro_batches": micro_batches,
        "n_data": N,
        "lr": lr,
        "lr_warmup": lr_warmup,
        "lr_decay": lr_decay,
        # A decaying rate depends on the run's length, so a resumed run must keep it.
        "lr_steps": steps if lr_decay != "constant" else None,
        "grad_clip": grad_clip,
        "ema_decay": ema_decay,
        "label_dropout": label_dropout,
        "autocast": None if autocast is None else str(autocast),
        # A custom loss_fn cannot be compared; the default loss is named by its arguments.
        "loss": None if custom_loss else f"{schedule!r}, prediction={prediction!r}, weighting={weighting is not None}",
    }
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    ema = EMA(model, ema_decay)
    losses: list[float] = []
    start, spent = 0, {"wall_s": 0.0, "cpu_s": 0.0}
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer, ema)
        stored = state["settings"]
        changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        if changed:
            raise ValueError(f"cannot resume {resume}: settings differ (stored, now): {changed}")
        start, losses, spent = state["step"], state["losses"].tolist(), dict(state["elapsed"])
        if start > steps:
            raise ValueError(f"{resume} is already at step {start} > steps={steps}")

    # `total` is the run's length (it sets the learning-rate schedule); this call stops at `steps`.
    total = steps
    if stop_after is not None:
        steps = max(start, min(total, stop_after))
    wall0, cpu0 = time.perf_counter(), time.process_time()

    def elapsed() -> dict:
        return {"wall_s": spent["wall_s"] + time.perf_counter() - wall0,
                "cpu_s": spent["cpu_s"] + time.process_time() - cpu0}

    def save(step: int) -> None:
        if rank == 0:
            save_checkpoint(checkpoint, model, optimizer, ema, step, losses, settings,
                            metadata=metadata, elapsed=elapsed())

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    batch = _MicroBatches(net, loss_fn, data, labels, label_dropout, null_class, seed, device, b,
                          micro_batches, world, rank, autocast)

    model.train()
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train")
    epoch, order = -1, None
    for k in range(start, steps):
        # 1. The batch: slice k mod S of this epoch's permutation.
        if k // per_epoch != epoch:
            epoch = k // per_epoch
            g_data = torch.Generator().manual_seed(derive_seed(seed, _DATA, epoch))
            order = torch.randperm(N, generator=g_data)
        idx = order[(k % per_epoch) * b : (k % per_epoch + 1) * b]
        # 2.-3. For each micro-batch of this process: its noise, seeded by (seed, k, part), the loss
        # and its gradient (averaged over all parts, across processes too).
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(k, lr, total, lr_warmup, lr_decay)
        optimizer.zero_grad(set_to_none=True)
        loss = batch.loss_and_gradients(idx, k)
        # 4. Gradient step, EMA.
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        ema.update(model)
        losses.append(loss)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"the loss is {losses[-1]} at step {k}")
        if callback is not None and rank == 0:
            callback(k, losses[-1])
        if bar is not None:
            bar.update(1)
            if k % 50 == 0 or k == total - 1:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if checkpoint is not None and checkpoint_every is not None and (k + 1) % checkpoint_every == 0:
            save(k + 1)
    if bar is not None:
        bar.close()
    if checkpoint is not None:
        save(steps)
    if world > 1:
        torch.distributed.barrier()  # the file is complete before any process reads it
    spent = elapsed()
    return TrainResult(model, ema, optimizer, losses, steps, spent["wall_s"], spent["cpu_s"])


class _MicroBatches:
    """Step $k$'s loss and gradients over this process's micro-batches (see {func}`train`)."""

    def __init__(self, net, loss_fn, data, labels, label_dropout, null_class, seed, device, b, micro_batches,
                 world, rank, autocast) -> None:
        self.net, self.loss_fn, self.data, self.labels = net, loss_fn, data, labels
        self.label_dropout, self.null_class, self.seed, self.device = label_dropout, null_class, seed, device
        self.size = b // micro_batches
        self.per_rank = micro_batches // world
        self.first = rank * self.per_rank  # index of this process's first part in the global batch
        self.world = world
        self.autocast = autocast

    def loss_and_gradients(self, idx: Tensor, k: int) -> float:
        """Accumulate the gradients of this process's parts of batch ``idx``; return the loss
        averaged over the whole global batch."""
        total = None
        for j in range(self.per_rank):
            m = self.first + j
            part = idx[m * self.size : (m + 1) * self.size]
            x0 = self.data[part].to(self.device)
            g = torch.Generator(device=self.device).manual_seed(_noise_seed(self.seed, k, m))
            y = None
            if self.labels is not None:
                y = self.labels[part].to(self.device)
                if self.label_dropout > 0:
                    drop = torch.rand(part.shape[0], generator=g, device=self.device) < self.label_dropout
                    y = torch.where(drop.reshape(-1, *(1,) * (y.ndim - 1)), torch.full_like(y, self.null_class), y)
            # DistributedDataParallel all-reduces the gradients in the last part's backward only
            # (no_sync must hold over the forward and the backward of the others).
            sync = self.world == 1 or j == self.per_rank - 1
            amp = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None else nullcontext()
            with nullcontext() if sync else self.net.no_sync():
                with amp:
                    loss = self.loss_fn(self.net, x0, y, g)
                (loss if self.per_rank == 1 else loss / self.per_rank).backward()
            total = loss.detach().float() if total is None else total + loss.detach().float()
        if self.per_rank > 1:
            total = total / self.per_rank
        if self.world > 1:
            total = total.clone()
            torch.distributed.all_reduce(total)
            total = total / self.world
        return total.item()


def _default_loss(schedule: Schedule, prediction: str, weighting: Weighting | None) -> LossFn:
    def loss_fn(model: nn.Module, x0: Tensor, y: Tensor | None, generator: torch.Generator) -> Tensor:
        return diffusion_loss(model, x0, schedule, prediction=prediction, weighting=weighting, y=y, generator=generator)

    return loss_fn
