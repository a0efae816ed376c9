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
  one). On the Triton path each call draws a fresh ``[seed, offset]`` pair on the device with
  ``torch.randint(..., generator=generator)``: one small extra kernel, no host
  synchronisation, and under CUDA-graph capture PyTorch advances the generator on each replay,
  so replays draw new noise and re-seeding the generator reproduces a run. On the reference
  path the noise is ``torch.randn(..., generator=generator)``; the two backends then draw
  different (equally distributed) noise.
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
    receives the result. The Triton path needs contiguous tensors.
    """
    _check_tensor("x", x)
    _check_tensor("pred", pred, x)
    c_x, c_pred, c_noise = (_coefficient(n, c, x) for n, c in (("c_x", c_x), ("c_pred", c_pred), ("c_noise", c_noise)))
    if c_x is None or c_pred is None:
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
        if c_noise is not None and noise is None and seed is None:
            seed = _device_seed(x, generator)
        return _triton_module().affine_step_triton(
            x,
            pred,
            c_x,
            c_pred,
            c_noise,
            noise=noise,
            seed=seed,
            offset=offset,
            clamp=clamp,
            out=out,
        )
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
    _check_tensor("x0", x0)
    a, s, c0, c1 = (_coefficient(n, c, x0) for n, c in (("a", a), ("s", s), ("c0", c0), ("c1", c1)))
    if a is None or s is None:
        raise TypeError("a and s are required")
    if noise is not None:
        _check_tensor("noise", noise, x0)
        if seed is not None:
            raise ValueError("pass noise or a seed, not both")
    elif seed is not None:
        _check_seed(seed, offset, x0)
    else:
        _check_generator(generator, x0)
    if c0 is not None or c1 is not None:
        c0 = 0.0 if c0 is None else c0
        c1 = 0.0 if c1 is None else c1
    if resolve_backend(x0, backend, noise) == "triton":
        if noise is None and seed is None:
            seed = _device_seed(x0, generator)
        return _triton_module().noise_add_triton(x0, a, s, c0, c1, noise=noise, seed=seed, offset=offset)
    if noise is None:
        noise = _reference_noise(x0, seed, offset, generator)
    return noise_add_reference(x0, a, s, noise, c0, c1)
