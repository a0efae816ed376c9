r"""Scaled dot-product attention: the FlashAttention kernel, its reference, and the dispatcher.

For queries $Q \in \R^{L_q\times D}$, keys $K\in\R^{L_k\times D}$ and values $V\in\R^{L_k\times D}$
of one (batch, head),

$$O = \mathrm{softmax}\big(c\,QK^\top\big)\,V, \qquad c = 1/\sqrt{D} \text{ by default},$$

with the softmax taken over keys (each row of $c\,QK^\top$). With key lengths $n_b$
(``kv_lens``), batch $b$ attends to its first $n_b$ keys only: the scores of keys $j \ge n_b$
are $-\infty$, so a right-padded context (text tokens) is the same as the unpadded one.
Public functions:

- `attention`: dispatches on the device: CUDA tensors run the Triton kernels of
  `stepdiff.kernels.attention_triton` (forward and backward, through a
  ``torch.autograd.Function``); CPU tensors run `attention_reference`, unless the Triton
  interpreter is asked for with ``backend="triton"`` or ``STEPDIFF_BACKEND=triton``.
- `attention_reference`: the same computation in plain PyTorch, written for clarity; it
  materializes the $L_q\times L_k$ matrix, and in float64 it is the ground truth of the tests.

Importing this module does not import Triton.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import weakref

import torch
from torch import Tensor

__all__ = ["MAX_HEAD_DIM", "attention", "attention_reference"]

MAX_HEAD_DIM = 256
_LAYOUTS = ("bhld", "blhd")
_BACKENDS = ("auto", "triton", "torch")  # as for the other kernels (STEPDIFF_BACKEND)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _to_bhld(t: Tensor, layout: str) -> Tensor:
    """A ``[B, H, L, D]`` view of ``t`` (a transpose for ``blhd``: no copy)."""
    return t if layout == "bhld" else t.transpose(1, 2)


def _check(q: Tensor, k: Tensor, v: Tensor, layout: str, scale: float | None) -> float:
    """Validate the inputs (given in ``layout``); return the softmax scale."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}; got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have 4 dims ([B, H, L, D] for layout 'bhld', "
                             f"[B, L, H, D] for 'blhd'); got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    qb, kb, vb = (_to_bhld(t, layout) for t in (q, k, v))
    B, H, Lq, D = qb.shape
    if kb.shape[:2] != (B, H) or vb.shape[:2] != (B, H):
        raise ValueError(f"batch and heads must agree: q has (B, H) = {(B, H)}, "
                         f"k {tuple(kb.shape[:2])}, v {tuple(vb.shape[:2])} (layout {layout!r})")
    if kb.shape[3] != D or vb.shape[3] != D:
        raise ValueError(f"head dims must agree: q has D = {D}, k {kb.shape[3]}, v {vb.shape[3]}")
    if kb.shape[2] != vb.shape[2]:
        raise ValueError(f"k and v must have the same length; got {kb.shape[2]} and {vb.shape[2]}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} exceeds the supported maximum {MAX_HEAD_DIM}")
    if min(B, H, Lq, kb.shape[2], D) < 1:
        raise ValueError(f"every size must be at least 1; got q {tuple(qb.shape)} and "
                         f"k {tuple(kb.shape)} as [B, H, L, D]")
    if scale is None:
        return 1.0 / math.sqrt(D)
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number; got {scale}")
    return scale


# The checked route of a call, by the shapes, dtypes and devices of q, k, v, the layout, the
# scale and the backend asked for: (softmax scale, whether the Triton kernels run). A repeated
# call skips the checks and the backend resolution (stepdiff/kernels/launch.py explains why).
_ROUTES: dict[tuple, tuple[float, bool]] = {}

# Inference calls (nothing to differentiate) on the Triton path, by backend asked for, layout,
# scale, causality and each tensor's shape, strides, dtype, device and alignment: (softmax
# scale, the forward plan of stepdiff.kernels.attention_triton).
_INFERENCE_PLANS: dict[tuple, tuple] = {}


def _signature(t: Tensor | None):
    """What a tensor contributes to a plan key (as in attention_triton)."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


# kv_lens tensors whose values were already checked, by id: (a weak reference, the tensor's
# version counter, (B, Lk, device)). A model passes the same kv_lens to every cross-attention
# layer and every sampling step; reading the values costs a device synchronisation, so it is
# done once per tensor and in-place change (the version counter moves on any in-place write).
# A tensor made under torch.inference_mode has no version counter (reading it raises): a CUDA
# one is checked at its first use only (version None: in-place writes to it are not seen, and
# the kernels clamp every length into [1, Lk], as under graph capture); a CPU one is checked at
# every call, which reads host memory and costs no synchronisation.
_CHECKED_KV_LENS: dict[int, tuple] = {}


def _check_kv_lens(kv_lens, q: Tensor, k: Tensor, layout: str) -> None:
    """Validate ``kv_lens``: an int64 ``[B]`` tensor on q's device with ``1 <= kv_lens <= Lk``."""
    B = q.shape[0]
    Lk = k.shape[2] if layout == "bhld" else k.shape[1]
    entry = _CHECKED_KV_LENS.get(id(kv_lens))
    # A tensor checked before, unchanged since (in-place writes and resizes move its version
    # counter; its dtype and device never change), for the same batch, keys and device; or a
    # CUDA inference tensor checked before (no version counter to compare).
    if (entry is not None and entry[0]() is kv_lens and entry[2] == (B, Lk, q.device)
            and (entry[1] is None or entry[1] == kv_lens._version)):
        return
    if not isinstance(kv_lens, Tensor):
        raise TypeError(f"kv_lens must be a torch.Tensor (int64, shape [B]) or None; "
                        f"got {type(kv_lens).__name__}")
    if kv_lens.dtype != torch.int64:
        raise TypeError(f"kv_lens must have dtype torch.int64; got {kv_lens.dtype}")
    if kv_lens.shape != (B,):
        raise ValueError(f"kv_lens must have shape [B] = [{B}]; got {list(kv_lens.shape)}")
    if kv_lens.device != q.device:
        raise ValueError(f"kv_lens is on {kv_lens.device} but q is on {q.device}")
    if kv_lens.device.type == "meta":
        return  # no values to read
    if kv_lens.is_cuda and torch.cuda.is_current_stream_capturing():
        # Values cannot be read during CUDA-graph capture; the kernels keep each length within
        # [1, Lk], so an unchecked value cannot make them read outside the key tensor.
        return
    low, high = (int(x) for x in torch.aminmax(kv_lens))
    if low < 1 or high > Lk:
        bad = kv_lens[(kv_lens < 1) | (kv_lens > Lk)].tolist()
        raise ValueError(f"kv_lens must lie in [1, Lk] = [1, {Lk}]; got {bad[:8]}"
                         f"{' ...' if len(bad) > 8 else ''}")
    inference = kv_lens.is_inference()
    if inference and not kv_lens.is_cuda:
        return  # re-checked at every call (see _CHECKED_KV_LENS)
    if len(_CHECKED_KV_LENS) > 64:  # drop entries whose tensors are gone
        for key in [key for key, e in _CHECKED_KV_LENS.items() if e[0]() is None]:
            del _CHECKED_KV_LENS[key]
    version = None if inference else kv_lens._version
    _CHECKED_KV_LENS[id(kv_lens)] = (weakref.ref(kv_lens), version, (B, Lk, q.device))


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, kv_lens: Tensor | None = None,
                        scale: float | None = None, causal: bool = False,
                        layout: str = "bhld") -> Tensor:
    r"""$O = \mathrm{softmax}(c\,QK^\top + M)\,V$ in plain PyTorch, scores held in memory.

    ``q [B, H, Lq, D]``, ``k, v [B, H, Lk, D]`` for ``layout="bhld"`` (or ``[B, L, H, D]`` each
    for ``"blhd"``); returns ``o`` in the same layout as ``q``. $M_{ij} = -\infty$ where
    ``causal`` and $j > i$ (query $i$ sees keys $0..i$, as ``is_causal`` in PyTorch), and for
    batch $b$ where $j \ge$ ``kv_lens[b]`` (keys past the batch's length), else 0. Padded keys
    and values are replaced by zeros before use, so whatever they hold (even NaN) changes
    nothing, and their gradients are exactly 0. Computed in float64 for float64 inputs,
    otherwise in float32, and returned in the input dtype. Differentiable by autograd.
    """
    c = _check(q, k, v, layout, scale)
    if kv_lens is not None:
        _check_kv_lens(kv_lens, q, k, layout)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qb, kb, vb = (_to_bhld(t, layout).to(compute) for t in (q, k, v))
    Lq, Lk = qb.shape[2], kb.shape[2]
    if kv_lens is not None:
        real = torch.arange(Lk, device=kb.device) < kv_lens[:, None]  # [B, Lk]
        kb = kb.masked_fill(~real[:, None, :, None], 0.0)
        vb = vb.masked_fill(~real[:, None, :, None], 0.0)
    s = c * (qb @ kb.transpose(-1, -2))  # [B, H, Lq, Lk]
    allowed = None
    if causal:
        allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).tril()
    if kv_lens is not None:
        allowed = real[:, None, None, :] if allowed is None else allowed & real[:, None, None, :]
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = (p @ vb).to(q.dtype)
    return o if layout == "bhld" else o.transpose(1, 2)


class _FlashAttention(torch.autograd.Function):
    """Triton forward; Triton backward recomputing P from the saved log-sum-exp."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, kv_lens: Tensor | None, scale: float,
                causal: bool) -> Tensor:
        kernels = _triton_module()
        # The forward's plan key fixes every input of the backward but dO: the backward's plan
        # is found from that key and dO's layout alone.
        ctx.plan_key = kernels.forward_key(q, k, v, kv_lens, causal)
        o, lse = kernels.attention_forward(q, k, v, scale, causal, kv_lens=kv_lens,
                                           key=ctx.plan_key)
        ctx.save_for_backward(q, k, v, o, lse, kv_lens)
        ctx.scale, ctx.causal = scale, causal
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor):
        q, k, v, o, lse, kv_lens = ctx.saved_tensors
        dq, dk, dv = _triton_module().attention_backward(do, q, k, v, o, lse, ctx.scale,
                                                          ctx.causal, kv_lens=kv_lens,
                                                          forward_key=ctx.plan_key)
        return dq, dk, dv, None, None, None


def _triton_module():
    """Import the Triton kernels on first use (this is what imports Triton)."""
    from . import attention_triton

    return attention_triton


def _resolve_backend(backend: str | None, q: Tensor) -> str:
    backend = backend or os.environ.get("STEPDIFF_BACKEND") or "auto"
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} (or None); got {backend!r}")
    if backend == "auto":
        usable = q.is_cuda and q.dtype in _TRITON_DTYPES
        return "triton" if usable and importlib.util.find_spec("triton") is not None else "torch"
    return backend


def _prepare_triton(q: Tensor) -> None:
    """Check that the Triton path can run these tensors, and on a CPU pick the interpreter."""
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32; got {q.dtype}")
    if q.is_cuda:
        return
    if q.device.type != "cpu":
        raise ValueError(f"the Triton kernels run on CUDA tensors (or CPU in the interpreter); "
                         f"got device {q.device}")
    if q.dtype == torch.bfloat16:
        raise TypeError("bfloat16 is not supported by Triton's CPU interpreter (its bf16 dot and "
                        "arithmetic are wrong); use float16/float32 on the CPU, or a GPU")
    loaded = sys.modules.get(f"{__package__}.attention_triton")
    if loaded is None:
        # The interpreter is chosen when the kernels are defined, at import. On a machine
        # without a GPU it is the only way Triton can run, so choose it here.
        if os.environ.get("TRITON_INTERPRET") != "1":
            if torch.cuda.is_available():
                raise RuntimeError("CPU tensors with backend='triton' need Triton's interpreter:"
                                   " set TRITON_INTERPRET=1 before stepdiff's kernels are first"
                                   " used")
            os.environ["TRITON_INTERPRET"] = "1"
    elif not loaded.INTERPRET:
        raise RuntimeError("the Triton kernels were compiled for the GPU (TRITON_INTERPRET was not "
                           "1 at their first use), so they cannot run CPU tensors; move the "
                           "tensors to CUDA or use backend='torch'")


def attention(q: Tensor, k: Tensor, v: Tensor, *, kv_lens: Tensor | None = None,
              scale: float | None = None, causal: bool = False, layout: str = "bhld",
              backend: str | None = None) -> Tensor:
    r"""Scaled dot-product attention $O = \mathrm{softmax}(c\,QK^\top)\,V$, differentiable.

    Shapes for ``layout="bhld"`` (the default): ``q [B, H, Lq, D]``, ``k, v [B, H, Lk, D]``,
    result ``o [B, H, Lq, D]``. For ``layout="blhd"`` every tensor is ``[B, L, H, D]`` (the
    layout a linear projection produces after ``view(B, L, H, D)``) and so is the result; no
    copy is made in either case: the kernels read any strides.

    - ``kv_lens``: ``None``, or an int64 tensor ``[B]`` on the device of ``q`` with
      ``1 <= kv_lens[b] <= Lk``: batch ``b`` attends to keys ``j < kv_lens[b]`` only, for every
      head and query (a right-padded context). The padded keys' gradients are exactly 0. The
      values are checked on the host once per tensor (one device synchronisation; repeated
      calls with the same, unmodified tensor are not checked again); under CUDA-graph capture
      they cannot be read, and the kernels clamp them into ``[1, Lk]``. A tensor made under
      ``torch.inference_mode`` has no version counter to show an in-place change: on the CPU
      it is checked at every call (no synchronisation needed), on CUDA at its first use only
      (later in-place writes are not re-checked; the kernels clamp them as above).
    - ``scale``: the $c$ above, default $1/\sqrt{D}$.
    - ``causal``: query $i$ attends to keys $j \le i$ only (top-left aligned, as PyTorch's
      ``is_causal``).
    - ``backend``: ``"auto"`` (default; also read from ``STEPDIFF_BACKEND``): CUDA tensors of
      dtype float16, bfloat16 or float32 take the Triton kernels (when Triton is installed),
      everything else (CPU, float64) the reference. ``"triton"`` forces the kernels (on a CPU:
      the Triton interpreter, float16 and float32 only); ``"torch"`` forces
      `attention_reference`.

    Any ``Lq, Lk >= 1`` and any head dim ``D <= 256``. The kernels accumulate in float32 and
    return the input dtype; their backward pass recomputes the attention probabilities from the
    saved log-sum-exp (no $L_q\times L_k$ matrix in memory) and is deterministic.
    """
    requested = backend or os.environ.get("STEPDIFF_BACKEND") or "auto"
    plain_scale = scale is None or type(scale) in (float, int)
    try:
        inference = not (torch.is_grad_enabled()
                         and (q.requires_grad or k.requires_grad or v.requires_grad))
        if inference and plain_scale:
            # The fast path: one key, made of the layouts the kernel's plan depends on, finds the
            # softmax scale and the forward plan checked on the first such call.
            fast_key = (requested, layout, scale, bool(causal), _signature(q), _signature(k),
                        _signature(v), _signature(kv_lens))
            known = _INFERENCE_PLANS.get(fast_key)
            if known is not None:
                if kv_lens is not None:
                    _check_kv_lens(kv_lens, q, k, layout)
                return known[1](q, k, v, known[0], kv_lens)[0]
        else:
            fast_key = None
    except (AttributeError, TypeError):
        fast_key = None
    try:
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
               layout, scale, requested)
        # Only a number is a value; a tensor scale could change in place between calls.
        route = _ROUTES.get(key) if scale is None or type(scale) in (float, int) else None
    except (AttributeError, TypeError):  # not tensors, or an unhashable scale: checked below
        key = route = None
    if route is None:
        c = _check(q, k, v, layout, scale)
        triton_path = _resolve_backend(backend, q) == "triton"
        if triton_path:
            _prepare_triton(q)
        route = (c, triton_path)
        if key is not None and (scale is None or type(scale) in (float, int)):
            _ROUTES[key] = route
    c, triton_path = route
    if kv_lens is not None:
        _check_kv_lens(kv_lens, q, k, layout)
    if not triton_path:
        return attention_reference(q, k, v, kv_lens=kv_lens, scale=c, causal=causal,
                                   layout=layout)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # Nothing to differentiate: no autograd node, no saved tensors, and the kernels read the
        # [B, L, H, D] layout through permuted strides (no transposed views made).
        kernels = _triton_module()
        plan_key = kernels.forward_key(q, k, v, kv_lens, causal, None, layout)
        o = kernels.attention_forward(q, k, v, c, bool(causal), kv_lens=kv_lens, layout=layout,
                                      key=plan_key)[0]
        if fast_key is not None:
            _INFERENCE_PLANS[fast_key] = (c, kernels._PLANS[plan_key])
        return o
    if layout == "blhd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    o = _FlashAttention.apply(q, k, v, kv_lens, c, bool(causal))
    return o if layout == "bhld" else o.transpose(1, 2)
