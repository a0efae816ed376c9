r"""The fused elementwise updates of diffusion: the forward noising and the sampler step.

Public functions (each dispatches on the device of its inputs):

- {py:func}`affine_step`: $x' = c_x x + c_{\rm pred}\,\mathrm{clamp}(p) + c_{\rm noise} z$, the
  form of every DDPM, DDIM, $x_0$-parametrized and Euler update;
- {py:func}`noise_add`: $x_t = a x_0 + s\varepsilon$ together with a target
  $c_0x_0 + c_1\varepsilon$.

**Backends.** CUDA tensors in float32, float16 or bfloat16 take the Triton kernels of
{py:mod}`stepdiff.kernels.fused_triton` (one launch, noise drawn in the kernel); everything
else takes the PyTorch references of {py:mod}`stepdiff.kernels.reference`. ``backend="triton"``
(or the environment variable ``STEPDIFF_BACKEND=triton``) asks for the kernels also on the
CPU, through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before the first
such call; ``backend="torch"`` asks for the references everywhere. Triton is imported only
when a Triton path is taken.

**Noise.** With ``noise`` given, that tensor is used. Otherwise:

- ``seed`` (an int, with an optional ``offset``) gives the counter-based Philox noise of
  {py:func}`stepdiff.kernels.reference.philox_normal_reference`, the same on every backend (to
  float32 rounding) and for any launch configuration;
- ``seed`` as an int64 tensor ``[seed, offset]`` on the data's device is read by the kernel
  at run time, so a CUDA graph that advances it on the device draws new noise on each replay
  (the reference path reads it on the host instead, which a graph cannot capture);
- else ``generator`` (a ``torch.Generator`` on the data's device, or ``None`` for the global
  one). On the Triton path with CUDA data, outside CUDA-graph capture, the kernel's seed is
  the generator's own Philox state read on the host (key = its seed, counter offset
  $2^{62}$ + its offset / 4), and the generator's offset then moves on by 4: no extra kernel,
  no synchronisation, and re-seeding the generator reproduces the draws. Under capture that
  host state would be frozen into the graph, so there each call draws a fresh
  ``[seed, offset]`` pair on the device with ``torch.randint(..., generator=generator)``
  (one small kernel inside the graph), which PyTorch advances on each replay: replays draw new
  noise and re-seeding reproduces them. A replayed graph and the same calls run eagerly thus
  draw different, equally distributed, noise. (CPU data in the interpreter use the
  ``randint`` draw too.) On the reference path the noise is
  ``torch.randn(..., generator=generator)``; the backends then draw different (equally
  distributed) noise.

**Plans.** A Triton call is checked once per *plan key* (dtypes, shapes, devices, strides and
alignment of the tensors, which arguments are tensors, the kind of noise): later calls with the
same key skip the checks and launch the compiled kernel directly
({py:mod}`stepdiff.kernels.launch`); only what changes from call to call (a seed's or clamp's
value) is checked each time.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from functools import lru_cache

import torch
from torch import Tensor

from .reference import affine_step_reference, noise_add_reference, philox_normal_reference

__all__ = ["affine_step", "noise_add", "resolve_backend", "BACKENDS"]

#: The values of ``backend=`` and of the environment variable ``STEPDIFF_BACKEND``.
BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SEED_HIGH = 2**63 - 1


@lru_cache(maxsize=1)
def _triton_module():
    """The Triton kernels module, imported on first use; ``None`` if Triton is unavailable."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from . import fused_triton
    except Exception as error:  # a broken Triton install must not break the package
        warnings.warn(f"Triton kernels unavailable, using PyTorch: {error}", stacklevel=3)
        return None
    return fused_triton


def resolve_backend(x: Tensor, backend: str | None = None, *others: Tensor | None) -> str:
    """``"triton"`` or ``"torch"``: the path that ``backend`` (default: ``STEPDIFF_BACKEND``,
    else ``"auto"``) selects for data ``x`` (and the other data tensors ``others``).

    ``"auto"`` takes Triton for CUDA tensors that are all float32, float16 or bfloat16, when
    Triton can be imported. Raises if Triton is asked for and cannot run.
    """
    requested = backend or os.environ.get("STEPDIFF_BACKEND", "auto") or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {requested!r}")
    if requested == "torch":
        return "torch"
    dtypes_ok = all(t.dtype in _TRITON_DTYPES for t in (x, *others) if t is not None)
    if requested == "auto":
        if x.is_cuda and dtypes_ok and _triton_module() is not None:
            return "triton"
        return "torch"
    if not dtypes_ok:
        found = sorted({str(t.dtype) for t in (x, *others) if t is not None})
        raise TypeError(f"the Triton kernels take float32, float16 or bfloat16; got {', '.join(found)}")
    if not (x.is_cuda or x.device.type == "cpu"):
        raise ValueError(f"the Triton kernels run on CUDA tensors (or the CPU, interpreted); got {x.device}")
    module = _triton_module()
    if module is None:
        raise RuntimeError("backend='triton' was requested but Triton cannot be imported")
    if x.device.type == "cpu" and not module.INTERPRETED:
        raise RuntimeError(
            "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before the first Triton call"
        )
    return "triton"


def _check_tensor(name: str, t: Tensor, like: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} must have the shape of x, {tuple(like.shape)}; got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but x is on {like.device}")


def _coefficient(name: str, c, x: Tensor):
    """Check a coefficient; a 0-d CPU tensor for data elsewhere becomes a Python float."""
    if c is None:
        return None
    if not isinstance(c, Tensor):
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise TypeError(f"{name} must be a float or a tensor; got {type(c).__name__}")
        return c
    if not c.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {c.dtype}")
    batch = x.shape[0] if x.ndim else 1
    if c.ndim > 1 or (c.ndim == 1 and c.shape[0] != batch):
        raise ValueError(f"{name} must be a scalar or have shape [{batch}] (one per sample); got {tuple(c.shape)}")
    if c.device != x.device:
        if c.ndim == 0 and c.device.type == "cpu":
            return float(c)  # reading a CPU scalar needs no device synchronisation
        raise ValueError(f"{name} is on {c.device} but x is on {x.device}")
    return c


def _check_seed(seed, offset: int, x: Tensor) -> None:
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.shape != (2,):
            raise ValueError(
                "a seed tensor must be int64 of shape [2] (seed, offset); "
                f"got {seed.dtype} of shape {tuple(seed.shape)}"
            )
        if seed.device != x.device:
            raise ValueError(f"the seed tensor is on {seed.device} but x is on {x.device}")
        if offset:
            raise ValueError("offset comes from the seed tensor; do not pass it separately")
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an int64 tensor [seed, offset]; got {type(seed).__name__}")
    elif not (0 <= seed <= _SEED_HIGH and 0 <= offset <= _SEED_HIGH):
        raise ValueError(f"seed and offset must lie in [0, 2**63 - 1]; got {seed}, {offset}")


def _check_generator(generator, x: Tensor) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but x is on {x.device}")


def _device_seed(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """A fresh Philox ``[seed, offset]`` drawn on the data's device: no host sync, capturable."""
    return torch.randint(0, _SEED_HIGH, (2,), generator=generator, device=x.device, dtype=torch.int64)


# --- noise from a generator without a kernel -----------------------------------------------------
#
# A CUDA generator is a Philox (seed, offset) pair kept on the host, advanced by each random op.
# Outside CUDA-graph capture the kernels' noise is drawn from that pair directly, on the host:
# key = the generator's seed, counter offset = 2**62 + offset / 4, then the generator's offset
# moves on by 4 (PyTorch's own step), so the next call, and the next random op of PyTorch, draw
# something else, and re-seeding the generator reproduces the draws. No kernel runs for it. The
# counters PyTorch's own kernels use under the same key have their top word 0 (subsequence =
# thread index < 2**32), ours have it >= 2**30: the streams never share a counter.
# Under capture the host pair would be frozen into the graph; there each call draws its
# [seed, offset] with torch.randint on the device (one tiny kernel inside the graph, no host
# time at replay), which PyTorch re-seeds from the generator at every replay. So a replayed
# graph and the same calls run eagerly draw from different, equally distributed, streams.
_GENERATOR_OFFSET_BASE = 2**62


def _on_gpu(x: Tensor) -> bool:
    """Whether ``x`` lives in GPU memory (the host-cost benchmark redirects this)."""
    return getattr(x, "is_cuda", False)


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_current_stream_capturing()


def _peek_generator(x: Tensor, generator):
    """``(seed, offset, generator, its offset)`` of the host draw for this call, or ``None``
    when the draw must be a device tensor (CPU data, or CUDA-graph capture). Nothing is
    advanced yet (`_take`)."""
    if not _on_gpu(x) or _capturing():
        return None
    g = generator if generator is not None else torch.cuda.default_generators[x.device.index]
    used = g.get_offset()
    return g.initial_seed() & _SEED_HIGH, _GENERATOR_OFFSET_BASE + used // 4, g, used


def _take(x: Tensor, generator, peeked):
    """This call's ``(seed, offset)`` for the kernel: the peeked host pair, the generator then
    advanced past it; or a pair drawn on the device."""
    if peeked is None:
        return _device_seed(x, generator), 0
    peeked[2].set_offset(peeked[3] + 4)
    return peeked[0], peeked[1]


def _generator_key(generator):
    return None if generator is None else (type(generator), generator.device.type)


_SEED_PLACEHOLDERS: dict = {}


def _drawn_seed_key(x: Tensor, peeked):
    """A stand-in for this call's drawn seed when building its key and plan: the host pair, or
    (for a seed drawn on the device, after the plan is found) any int64 ``[2]`` tensor on the
    data's device, as every such tensor keys and checks alike."""
    if peeked is not None:
        return peeked[0], peeked[1]
    placeholder = _SEED_PLACEHOLDERS.get(x.device)
    if placeholder is None:
        placeholder = _SEED_PLACEHOLDERS[x.device] = torch.zeros(2, dtype=torch.int64, device=x.device)
    return placeholder, 0


_PUBLIC_PLANS: dict = {}
_PUBLIC_KEY_ERRORS = (AttributeError, TypeError, IndexError, RuntimeError)


def _public_key(kind: str, requested: str, launcher_key: tuple, generator, draw: bool, peeked) -> tuple:
    return (kind, requested, launcher_key, _generator_key(generator), draw, peeked is None)


def _reference_noise(x: Tensor, seed, offset: int, generator) -> Tensor:
    if seed is None:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if isinstance(seed, Tensor):
        seed, offset = (int(v) for v in seed.tolist())
    return philox_normal_reference(x.shape, seed, offset, device=x.device, dtype=x.dtype)


def affine_step(
    x: Tensor,
    pred: Tensor,
    c_x: Tensor | float,
    c_pred: Tensor | float,
    c_noise: Tensor | float | None = None,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    clamp: float | None = None,
    seed: int | Tensor | None = None,
    offset: int = 0,
    out: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    r"""One sampler update $x' = c_x\,x + c_{\rm pred}\,\mathrm{clamp}(p) + c_{\rm noise}\,z$.

    ``x`` and ``pred`` have shape ``[B, ...]``; each coefficient is a float, a 0-d tensor or a
    ``[B]`` tensor (one value per sample). ``c_noise=None`` means a deterministic step; else
    $z$ comes from ``noise``, ``seed``/``offset`` or ``generator`` (see the module docstring).
    ``clamp`` clips the prediction to $[-c, c]$ first. ``out`` (optional, may be ``x``)
    receives the result. The Triton path needs contiguous tensors. A repeated Triton call with
    the same dtypes, shapes and kinds of argument reuses the plan checked on its first call.
    """
    requested = backend or os.environ.get("STEPDIFF_BACKEND") or "auto"
    draw = c_noise is not None and noise is None and seed is None
    key = None
    if requested == "triton" or (requested == "auto" and _on_gpu(x)):
        try:
            peeked = _peek_generator(x, generator) if draw else None
            s, o = (_drawn_seed_key(x, peeked) if draw else (seed, offset))
            key = _public_key("affine_step", requested, _triton_module().affine_step_key(
                x, pred, c_x, c_pred, c_noise, noise, s, o, clamp, out, None, None), generator, draw, peeked)
            plan = _PUBLIC_PLANS.get(key)
        except _PUBLIC_KEY_ERRORS:  # not even tensors: the checks below say what is wrong
            key = plan = None
        if plan is not None:
            if draw:
                seed, offset = _take(x, generator, peeked)
            return plan(x, pred, c_x, c_pred, c_noise, noise, seed, offset, clamp, out)
    _check_tensor("x", x)
    _check_tensor("pred", pred, x)
    coefficients = [_coefficient(n, c, x) for n, c in (("c_x", c_x), ("c_pred", c_pred), ("c_noise", c_noise))]
    if coefficients[0] is None or coefficients[1] is None:
        raise TypeError("c_x and c_pred are required")
    if clamp is not None and not clamp >= 0:
        raise ValueError(f"clamp must be a non-negative number; got {clamp}")
    if out is not None:
        _check_tensor("out", out, x)
    if c_noise is not None:
        if noise is not None:
            _check_tensor("noise", noise, x)
            if seed is not None:
                raise ValueError("pass noise or a seed, not both")
        elif seed is not None:
            _check_seed(seed, offset, x)
        else:
            _check_generator(generator, x)
    if resolve_backend(x, backend, pred, noise if c_noise is not None else None, out) == "triton":
        peeked = _peek_generator(x, generator) if draw else None
        s, o = (_drawn_seed_key(x, peeked) if draw else (seed, offset))
        plan = _triton_module().affine_step_plan(x, pred, c_x, c_pred, c_noise, noise, s, o, clamp, out, None, None)
        if key is not None:
            _PUBLIC_PLANS[key] = plan
            if peeked is not None:
                # The same call under CUDA-graph capture draws its seed on the device: a kernel
                # variant of its own, compiled now, as nothing can be compiled while capturing.
                s, o = _drawn_seed_key(x, None)
                capture_key = _public_key("affine_step", requested, _triton_module().affine_step_key(
                    x, pred, c_x, c_pred, c_noise, noise, s, o, clamp, out, None, None), generator, draw, None)
                if capture_key not in _PUBLIC_PLANS:
                    capture = _triton_module().affine_step_plan(
                        x, pred, c_x, c_pred, c_noise, noise, s, o, clamp, out, None, None)
                    capture.warm(x, pred, c_x, c_pred, c_noise, noise, s, o, clamp, out)
                    _PUBLIC_PLANS[capture_key] = capture
        if draw:
            seed, offset = _take(x, generator, peeked)
        return plan(x, pred, c_x, c_pred, c_noise, noise, seed, offset, clamp, out)
    c_x, c_pred, c_noise = coefficients
    if c_noise is not None and noise is None:
        noise = _reference_noise(x, seed, offset, generator)
    result = affine_step_reference(x, pred, c_x, c_pred, c_noise, noise, clamp)
    return result if out is None else out.copy_(result)


def noise_add(
    x0: Tensor,
    a: Tensor | float,
    s: Tensor | float,
    c0: Tensor | float | None = None,
    c1: Tensor | float | None = None,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | Tensor | None = None,
    offset: int = 0,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The forward noising $x_t = a\,x_0 + s\,\varepsilon$ and a target $c_0x_0 + c_1\varepsilon$.

    Coefficients as in {py:func}`affine_step`; if only one of ``c0``, ``c1`` is given the other
    counts as 0. $\varepsilon$ comes from ``noise``, ``seed``/``offset`` or ``generator``.
    With $(c_0, c_1) = (-s, a)$ the target is $v$, with $(\dot a, \dot s)$ the velocity.
    """
    requested = backend or os.environ.get("STEPDIFF_BACKEND") or "auto"
    draw = noise is None and seed is None
    key = None
    if requested == "triton" or (requested == "auto" and _on_gpu(x0)):
        try:
            peeked = _peek_generator(x0, generator) if draw else None
            sd, o = (_drawn_seed_key(x0, peeked) if draw else (seed, offset))
            key = _public_key("noise_add", requested, _triton_module().noise_add_key(
                x0, a, s, c0, c1, noise, sd, o, None, None), generator, draw, peeked)
            plan = _PUBLIC_PLANS.get(key)
        except _PUBLIC_KEY_ERRORS:
            key = plan = None
        if plan is not None:
            if draw:
                seed, offset = _take(x0, generator, peeked)
            return plan(x0, a, s, c0, c1, noise, seed, offset)
    _check_tensor("x0", x0)
    coefficients = [_coefficient(n, c, x0) for n, c in (("a", a), ("s", s), ("c0", c0), ("c1", c1))]
    if coefficients[0] is None or coefficients[1] is None:
        raise TypeError("a and s are required")
    if noise is not None:
        _check_tensor("noise", noise, x0)
        if seed is not None:
            raise ValueError("pass noise or a seed, not both")
    elif seed is not None:
        _check_seed(seed, offset, x0)
    else:
        _check_generator(generator, x0)
    if resolve_backend(x0, backend, noise) == "triton":
        peeked = _peek_generator(x0, generator) if draw else None
        sd, o = (_drawn_seed_key(x0, peeked) if draw else (seed, offset))
        plan = _triton_module().noise_add_plan(x0, a, s, c0, c1, noise, sd, o, None, None)
        if key is not None:
            _PUBLIC_PLANS[key] = plan
            if peeked is not None:  # the variant for CUDA-graph capture, as in affine_step
                sd, o = _drawn_seed_key(x0, None)
                capture_key = _public_key("noise_add", requested, _triton_module().noise_add_key(
                    x0, a, s, c0, c1, noise, sd, o, None, None), generator, draw, None)
                if capture_key not in _PUBLIC_PLANS:
                    capture = _triton_module().noise_add_plan(x0, a, s, c0, c1, noise, sd, o, None, None)
                    capture.warm(x0, a, s, c0, c1, noise, sd, o)
                    _PUBLIC_PLANS[capture_key] = capture
        if draw:
            seed, offset = _take(x0, generator, peeked)
        return plan(x0, a, s, c0, c1, noise, seed, offset)
    a, s, c0, c1 = coefficients
    if c0 is not None or c1 is not None:
        c0 = 0.0 if c0 is None else c0
        c1 = 0.0 if c1 is None else c1
    if noise is None:
        noise = _reference_noise(x0, seed, offset, generator)
    return noise_add_reference(x0, a, s, noise, c0, c1)
