r"""Classifier-free guidance: one wrapper that turns a conditional model into a guided one.

A network trained with its condition sometimes dropped (``label_dropout`` in
{func}`stepdiff.train.train`, text dropout for a text-conditioned model) predicts both
$p_c = f(x_t, t, c)$ and $p_u = f(x_t, t, \varnothing)$. Classifier-free guidance (Ho & Salimans
2022) samples with

$$p_w = p_u + w\,(p_c - p_u),$$

so $w = 0$ is the unconditional model, $w = 1$ the conditional one and $w > 1$ pushes further
along the direction the condition adds. Because every parametrization is an affine function
of the $x_0$-prediction with the same coefficients for both branches
({mod}`stepdiff.parametrize`), the guided prediction is the same whichever target the network
was trained on; in score form it is the score of the tilted density
$p_t(x)\,p_t(c\mid x)^w$:

$$\nabla\log p_t(x) + w\big(\nabla\log p_t(x\mid c) - \nabla\log p_t(x)\big).$$

{class}`ClassifierFreeGuidance` wraps a model called ``model(x, t, y=..., context=...,
context_mask=...)`` into a callable ``guided(x, t)`` that any sampler of
{mod}`stepdiff.samplers` accepts; the samplers never learn about conditions. Two refinements:

- **guidance rescale** $\varphi$ (Lin et al. 2024, §3.4): pull the per-sample standard deviation of
  the guided prediction back to that of the conditional one, then mix by $\varphi$;
- **a guidance interval** (Kynkäänniemi et al. 2024): guide only for $t \in [t_{lo}, t_{hi}]$ and use
  the conditional model elsewhere, where it then evaluates one branch only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .parametrize import PREDICTIONS, broadcast_to, conversion_coefficients
from .schedules import Schedule, _as_time

__all__ = ["ClassifierFreeGuidance"]


def _check_scale(w: float | Tensor) -> float | Tensor:
    if isinstance(w, bool):
        raise TypeError(f"w (the guidance scale) must be a number or a tensor [B]; got {w!r}")
    if isinstance(w, Tensor):
        if w.ndim > 1 or not w.is_floating_point():
            raise ValueError(
                f"w (the guidance scale) must be a float scalar or [B] tensor; got {w.dtype} {tuple(w.shape)}"
            )
        if w.numel() and (bool(torch.isnan(w).any()) or float(w.min()) < 0):
            raise ValueError(f"w (the guidance scale) must be >= 0; got values down to {float(w.min())}")
        return w.reshape(()) if w.ndim == 1 and w.numel() == 1 else w
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise TypeError(f"w (the guidance scale) must be a number or a tensor [B]; got {type(w).__name__}") from None
    if not w >= 0:  # also catches NaN
        raise ValueError(f"w (the guidance scale) must be >= 0; got {w}")
    return w


def _check_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"interval must be a pair (t_lo, t_hi); got {interval!r}") from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"interval must satisfy 0 <= t_lo <= t_hi <= 1 (times in [0, 1]); got ({lo}, {hi})")
    return lo, hi


def _pad_tokens(ids: Tensor, length: int, pad_id: int | None, name: str) -> Tensor:
    """Right-pad token rows ``[B, L]`` to ``length`` with ``pad_id``."""
    if ids.shape[1] == length:
        return ids
    if pad_id is None:
        raise ValueError(
            f"{name} has {ids.shape[1]} tokens per row but the batch needs {length}; pass pad_id "
            "(the tokenizer's pad_id) so that the shorter rows can be right-padded"
        )
    return torch.nn.functional.pad(ids, (0, length - ids.shape[1]), value=pad_id)


class ClassifierFreeGuidance:
    r"""A conditional model guided at scale $w$, called as ``guided(x, t)`` by any sampler.

    The guided prediction is $p_w = p_u + w\,(p_c - p_u)$ with $p_c$ = ``model(x, t, <condition>)``
    and $p_u$ = ``model(x, t, <null condition>)``, both computed in one batched call (the two
    batches concatenated along the first axis). Exactly:

    - $w = 1$ returns the conditional model's output, bit for bit, and evaluates only that branch;
    - $w = 0$ (with $\varphi = 0$) returns the unconditional model's output, bit for bit, and
      evaluates only that branch.

    **The condition** (exactly one kind):

    - ``y``: class ids, an ``int`` (the same class for every sample) or a ``LongTensor [B]``; the
      null condition is ``null`` if given, else ``model.null_class``;
    - ``y``: token ids ``LongTensor [B, L]`` for a text-conditioned model (which embeds them
      itself, e.g. {class}`stepdiff.models.text.TextConditioned`); ``null``: token rows ``[L']`` or
      ``[B, L']`` (e.g. the tokenizer's ``empty(B)``), by default ``model.null_ids``; rows of
      different lengths are right-padded with ``pad_id`` (by default ``model.pad_id``);
    - ``context`` ``[B, L, D]`` with ``context_mask`` ``BoolTensor [B, L]`` (``True`` = real token;
      all ``True`` if omitted); ``null_context`` ``[L', D]`` or ``[B, L', D]`` is required, with
      ``null_context_mask`` likewise. The shorter of the two is right-padded with zeros whose mask
      is ``False``, which changes nothing by the padding contract of the models.

    **The scale** ``w`` $\ge 0$: a float, or a tensor ``[B]`` for one scale per sample (a guidance
    sweep in one batch). Values are not clipped; $w < 0$ is an error.

    **Guidance rescale** ``rescale`` $= \varphi \in [0, 1]$ (Lin et al. 2024, eqs. 15-19):

    $$p_{\rm rescaled} = p_w\,\frac{\mathrm{std}(p_c)}{\mathrm{std}(p_w)},\qquad
    p_{\rm final} = \varphi\, p_{\rm rescaled} + (1 - \varphi)\,p_w,$$

    with $\mathrm{std}$ per sample over all non-batch entries. Unlike guidance itself this is not
    the same in every parametrization: the paper applies it to its networks' outputs, which
    predict $v = \alpha\varepsilon - \sigma x_0$ (its fix 2), so it is applied here to the
    $v$-prediction by default (``rescale_on="v"``). Implementations differ here (diffusers
    rescales whatever the network predicts, usually $\varepsilon$; some ports rescale
    $\hat x_0$), and ``rescale_on`` picks any of them. When ``prediction`` (what the model returns) differs from
    ``rescale_on``, both branches and the guided prediction are converted to ``rescale_on`` with
    {func}`stepdiff.parametrize.conversion_coefficients` (which needs ``schedule``), rescaled, and
    converted back. $\varphi = 0$ is plain guidance; $\varphi = 1$ gives each sample exactly the
    conditional prediction's standard deviation (in the ``rescale_on`` space).

    **Guidance interval** ``interval`` $= (t_{lo}, t_{hi})$, $0 \le t_{lo} \le t_{hi} \le 1$
    (Kynkäänniemi et al. 2024): a sample whose $t$ lies outside $[t_{lo}, t_{hi}]$ gets the
    conditional prediction ($w = 1$) and its unconditional branch is not evaluated.

    The wrapper computes in the model's dtype. It is not an ``nn.Module`` and holds no
    parameters; gradients flow through it like through the model.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        w: float | Tensor,
        *,
        y: int | Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        null: int | Tensor | None = None,
        null_context: Tensor | None = None,
        null_context_mask: Tensor | None = None,
        pad_id: int | None = None,
        rescale: float = 0.0,
        rescale_on: str = "v",
        prediction: str | None = None,
        schedule: Schedule | None = None,
        interval: tuple[float, float] | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t, y=..., ...); got {type(model).__name__}")
        self.model = model
        self.w = _check_scale(w)
        self.interval = _check_interval(interval)
        if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale (phi) must be a number in [0, 1]; got {rescale!r}")
        self.rescale = float(rescale)
        if rescale_on not in PREDICTIONS:
            raise ValueError(f"unknown rescale_on {rescale_on!r}; choose one of {PREDICTIONS}")
        if prediction is not None and prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if self.rescale > 0 and prediction is None:
            raise ValueError(
                "rescale > 0 needs prediction= (what the model returns) to apply the rescale to the "
                f"{rescale_on!r}-prediction"
            )
        if self.rescale > 0 and prediction != rescale_on and schedule is None:
            raise ValueError(
                f"rescale > 0 with prediction={prediction!r} needs schedule= to convert to rescale_on={rescale_on!r}"
            )
        self.rescale_on, self.prediction, self.schedule = rescale_on, prediction, schedule
        self.pad_id = pad_id
        self._set_condition(y, context, context_mask, null, null_context, null_context_mask)

    # --- the condition and its null ------------------------------------------------------------

    def _set_condition(self, y, context, context_mask, null, null_context, null_context_mask) -> None:
        if (y is None) == (context is None):
            raise ValueError("give exactly one condition: y (class or token ids) or context (with context_mask)")
        if y is not None:
            if context_mask is not None or null_context is not None or null_context_mask is not None:
                raise ValueError("context_mask / null_context / null_context_mask go with context=, not with y=")
            if isinstance(y, bool):
                raise TypeError(f"y must be an int or a LongTensor; got {y!r}")
            if isinstance(y, int):
                y = torch.tensor([y])
                self._broadcast = True
            else:
                self._broadcast = False
            if not isinstance(y, Tensor) or y.dtype not in (torch.int32, torch.int64) or y.ndim not in (1, 2):
                desc = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(f"y must be class ids LongTensor [B] or token ids LongTensor [B, L]; got {desc}")
            self.kind = "class" if y.ndim == 1 else "tokens"
            if self.kind == "class":
                if null is None:
                    null = getattr(self.model, "null_class", None)
                    if null is None:
                        raise ValueError(
                            "the model has no null_class (it is unconditional, or not a class-conditional "
                            "model); pass null= explicitly"
                        )
                if isinstance(null, Tensor):
                    if null.numel() != 1:
                        raise ValueError(f"null for class ids must be one class id; got shape {tuple(null.shape)}")
                    null = int(null)
                if isinstance(null, bool) or not isinstance(null, int):
                    raise ValueError(f"null for class ids must be an int class id; got {null!r}")
                self.null = torch.tensor([null], dtype=y.dtype, device=y.device)
            else:
                if null is None:
                    null = getattr(self.model, "null_ids", None)
                    if null is None:
                        raise ValueError(
                            "token-id conditions need null= (the 'no caption' token row, e.g. the tokenizer's "
                            "empty()) when the model has no null_ids"
                        )
                if self.pad_id is None:
                    self.pad_id = getattr(self.model, "pad_id", None)
                if (
                    not isinstance(null, Tensor)
                    or null.dtype not in (torch.int32, torch.int64)
                    or null.ndim not in (1, 2)
                ):
                    raise ValueError("null for token ids must be a LongTensor [L] or [B, L]")
                self.null = (null[None] if null.ndim == 1 else null).to(device=y.device, dtype=y.dtype)
            self.y = y
            self.context = self.context_mask = None
        else:
            if null is not None:
                raise ValueError("null= goes with y=; for context= give null_context= (and null_context_mask=)")
            if not isinstance(context, Tensor) or context.ndim != 3 or not context.is_floating_point():
                raise ValueError(f"context must be a float tensor [B, L, D]; got {getattr(context, 'shape', context)}")
            if null_context is None:
                raise ValueError("context conditions need null_context= (the unconditional context)")
            if null_context.ndim == 2:
                null_context = null_context[None]
            if null_context.ndim != 3 or null_context.shape[-1] != context.shape[-1]:
                raise ValueError(
                    f"null_context must be [L', {context.shape[-1]}] or [B, L', {context.shape[-1]}]; "
                    f"got {tuple(null_context.shape)}"
                )
            context_mask = self._check_mask(context_mask, context, "context_mask")
            null_context_mask = self._check_mask(null_context_mask, null_context, "null_context_mask")
            self.kind, self._broadcast = "context", False
            self.y = self.null = None
            self.context, self.context_mask = context, context_mask
            self.null_context, self.null_context_mask = null_context.to(context), null_context_mask

    @staticmethod
    def _check_mask(mask: Tensor | None, ctx: Tensor, name: str) -> Tensor:
        if mask is None:
            return torch.ones(ctx.shape[:2], dtype=torch.bool, device=ctx.device)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != ctx.shape[:2]:
            desc = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"{name} must be a BoolTensor of shape {tuple(ctx.shape[:2])}; got {desc}")
        return mask

    def _conditions(self, B: int, device: torch.device) -> tuple[dict, dict]:
        """Keyword arguments of the conditional and the unconditional branch, each for ``B`` samples."""
        if self.kind == "context":
            if self.context.shape[0] != B:
                raise ValueError(f"context has batch {self.context.shape[0]} but x has batch {B}")
            nc, nm = self.null_context, self.null_context_mask
            if nc.shape[0] not in (1, B):
                raise ValueError(f"null_context has batch {nc.shape[0]}; it must be 1 or the batch of x, {B}")
            nc, nm = nc.expand(B, -1, -1), nm.expand(B, -1)
            L = max(self.context.shape[1], nc.shape[1])
            c, cm = self._pad_context(self.context, self.context_mask, L)
            nc, nm = self._pad_context(nc, nm, L)
            return {"context": c.to(device), "context_mask": cm.to(device)}, {
                "context": nc.to(device),
                "context_mask": nm.to(device),
            }
        y = self.y.expand(B) if self._broadcast else self.y
        if y.shape[0] != B:
            raise ValueError(f"y has batch {y.shape[0]} (shape {tuple(y.shape)}) but x has batch {B}")
        if self.kind == "class":
            return {"y": y.to(device)}, {"y": self.null.expand(B).to(device)}
        null = self.null
        if null.shape[0] not in (1, B):
            raise ValueError(f"null has batch {null.shape[0]}; it must be 1 or the batch of x, {B}")
        null = null.expand(B, -1)
        L = max(y.shape[1], null.shape[1])
        y, null = _pad_tokens(y, L, self.pad_id, "y"), _pad_tokens(null, L, self.pad_id, "null")
        return {"y": y.to(device)}, {"y": null.to(device)}

    @staticmethod
    def _pad_context(ctx: Tensor, mask: Tensor, L: int) -> tuple[Tensor, Tensor]:
        extra = L - ctx.shape[1]
        if extra == 0:
            return ctx, mask
        return torch.nn.functional.pad(ctx, (0, 0, 0, extra)), torch.nn.functional.pad(mask, (0, extra), value=False)

    # --- the guided call --------------------------------------------------------------------

    def scales(self, t: Tensor, B: int) -> Tensor:
        r"""The effective per-sample scale ``[B]`` (float64): $w$ inside the interval, 1 outside."""
        w = torch.as_tensor(self.w, dtype=torch.float64, device=t.device)
        w = w.expand(B) if w.ndim == 0 else w.to(torch.float64)
        if w.shape != (B,):
            raise ValueError(f"w has {w.shape[0]} scales but x has batch {B}")
        if self.interval is not None:
            lo, hi = self.interval
            t64 = t.to(torch.float64)
            w = torch.where((t64 >= lo) & (t64 <= hi), w, torch.ones_like(w))
        return w

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        B = x.shape[0]
        t = _as_time(t).to(x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or have shape [{B}]; got {tuple(t.shape)}")
        w = self.scales(t, B)
        cond, uncond = self._conditions(B, x.device)
        need_u = w != 1.0
        need_c = (w != 0.0) | (self.rescale > 0)
        # One branch for the whole batch: call the model exactly as the caller would.
        if not bool(need_u.any()):
            return self.model(x, t, **cond)
        if not bool(need_c.any()):
            return self.model(x, t, **uncond)
        # Otherwise one batched call: the rows that need the conditional branch, then those that
        # need the unconditional one (outside the interval only the former).
        ic, iu = need_c.nonzero().squeeze(1), need_u.nonzero().squeeze(1)
        x_in = torch.cat([x[ic], x[iu]])
        t_in = torch.cat([t[ic], t[iu]])
        kw = {k: torch.cat([cond[k][ic], uncond[k][iu]]) for k in cond}
        out = self.model(x_in, t_in, **kw)
        if not isinstance(out, Tensor) or out.shape != x_in.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the model returned {shape} for an input of shape {tuple(x_in.shape)}; it must match")
        p_c = torch.zeros_like(x) if ic.numel() < B else None
        p_c = out[: ic.numel()] if p_c is None else p_c.index_copy(0, ic, out[: ic.numel()])
        p_u = torch.zeros_like(x).index_copy(0, iu, out[ic.numel() :])
        wb = broadcast_to(w, p_c)
        guided = p_u + wb * (p_c - p_u)
        if self.rescale > 0:
            guided = self._rescale(guided, p_c, x, t)
        # Exact endpoints: w = 1 is the conditional output, w = 0 (without rescale) the unconditional one.
        shape = (B,) + (1,) * (x.ndim - 1)
        guided = torch.where((w == 1.0).reshape(shape), p_c, guided)
        if self.rescale == 0:
            guided = torch.where((w == 0.0).reshape(shape), p_u, guided)
        return guided

    def _rescale(self, guided: Tensor, p_c: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Lin et al.'s rescale in the ``rescale_on`` space (see the class docstring)."""
        src, dst = self.prediction, self.rescale_on
        if src != dst:
            a, b = conversion_coefficients(self.schedule, t.to(torch.float64), src, dst)
            if not bool(torch.isfinite(a).all() and torch.isfinite(b).all() and (b != 0).all()):
                raise ValueError(
                    f"cannot convert {src!r} to {dst!r} at t in [{float(t.min()):.4g}, {float(t.max()):.4g}] "
                    f"under {self.schedule!r} (a coefficient is infinite or the map is not invertible); "
                    "choose another rescale_on"
                )
            a, b = broadcast_to(a, x), broadcast_to(b, x)
            guided, p_c = a * x + b * guided, a * x + b * p_c
        dims = tuple(range(1, guided.ndim))
        std_c = p_c.std(dim=dims, keepdim=True)
        std_g = guided.std(dim=dims, keepdim=True)
        # A constant guided prediction has no spread to rescale: keep it (factor 1).
        factor = torch.where(std_g > 0, std_c / std_g.clamp(min=torch.finfo(std_g.dtype).tiny), torch.ones_like(std_g))
        out = self.rescale * guided * factor + (1.0 - self.rescale) * guided
        if src != dst:
            out = (out - a * x) / b
        return out

    def __repr__(self) -> str:
        parts = [f"w={self.w if not isinstance(self.w, Tensor) else tuple(self.w.shape)}", f"kind={self.kind}"]
        if self.rescale:
            parts.append(f"rescale={self.rescale} on {self.rescale_on!r}")
        if self.interval is not None:
            parts.append(f"interval={self.interval}")
        return f"ClassifierFreeGuidance({', '.join(parts)})"
