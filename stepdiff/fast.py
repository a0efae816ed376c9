r"""A fast sampling path: a whole DDIM run on a GPU as one CUDA graph, replayed.

{py:func}`stepdiff.samplers.sample_ddim` walks the grid $t_0 > \dots > t_n = 0$ with one network
evaluation and one fused update per step,

$$x_{t_{i+1}} = c_x^{(i)}\,x_{t_i} + c_p^{(i)}\,f_\theta(x_{t_i}, t_i) + c_z^{(i)}\,z_i,$$

the coefficients depending only on the grid (DDIM with stochasticity $\eta$, the model's
parametrization folded in; $c_z = 0$ for $\eta = 0$). Run eagerly, every step pays Python and
launch time for each of the network's few hundred kernels. {py:func}`fast_sampler` removes
all of it:

- the coefficients are computed once, at construction, into device tables;
- the network runs under ``torch.autocast`` (bfloat16 by default on CUDA), a UNet in
  channels-last memory format ({py:meth}`stepdiff.models.unet.UNet.set_channels_last`), with the
  package's Triton kernels (flash attention, the fused GroupNorm+SiLU and adaLN modulate, and
  the fused update with its noise drawn in the kernel);
- the $n$ steps are captured once into one CUDA graph over static buffers, after a short eager
  warm-up on a side stream (which compiles and autotunes every kernel: nothing can compile
  during capture), and each call replays it: one launch for the whole run.

On a machine without CUDA (or with ``graph=False``) the same loop runs eagerly; with the
defaults there (no autocast, no layout change) it computes exactly what ``sample_ddim`` does,
bit for bit.

What a replay reuses: the graph reads the model's parameters where they are, so updating them
in place (an optimiser step, ``load_state_dict``) is seen by the next replay, while replacing
them (``model.to(...)`` to another device or dtype) needs a new sampler. Python-side state of
the model (a new ``model_kwargs`` tensor, a changed flag) is frozen at capture. With $\eta > 0$
each replay draws new noise from the generator (re-seeding it reproduces a replay); a replay
and the eager loop draw different, equally distributed noise (see {py:mod}`stepdiff.kernels.fused`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from .kernels import affine_step
from .parametrize import PREDICTIONS, conversion_coefficients
from .samplers import ddim_coefficients
from .schedules import Schedule

__all__ = ["FastSampler", "fast_sampler"]

_AUTO = "auto"


class FastSampler:
    r"""A prepared DDIM run, $x_{t_0} \mapsto x_0$ by $x_{t_{i+1}} = c_x^{(i)} x_{t_i} +
    c_p^{(i)} f_\theta(x_{t_i}, t_i) + c_z^{(i)} z_i$; built by {py:func}`fast_sampler`.

    Call it as ``sampler(noise=None)``: ``noise`` is $x_{t_0}$, of the sampler's ``shape``
    (copied into the static input, so the caller's tensor is left alone), or ``None`` to draw
    it from a standard normal with the sampler's generator. Returns a new tensor of dtype
    ``dtype`` (``copy=False`` returns the static output buffer itself, which the next call
    overwrites). ``graphed`` says whether calls replay a CUDA graph.
    """

    def __init__(self, model, schedule: Schedule, ts, shape, *, eta, prediction, model_kwargs, generator,
                 device, dtype, amp_dtype, channels_last, graph, warmup_steps):
        self.model, self.schedule = model, schedule
        self.shape = tuple(shape)
        self.device, self.dtype, self.amp_dtype = device, dtype, amp_dtype
        self.eta, self.prediction = eta, prediction
        self.model_kwargs = dict(model_kwargs or {})
        self.generator = generator
        self.ts = ts
        self.n = ts.numel() - 1
        self._tables(ts)
        self.channels_last = channels_last
        if channels_last:
            model.set_channels_last(True)
        self._x = torch.empty(self.shape, device=device, dtype=dtype)  # static input, updated in place
        self._out: Tensor | None = None
        self.graph = None
        self.graphed = False
        if graph:
            self._capture(warmup_steps)

    def _tables(self, ts: Tensor) -> None:
        """Coefficient tables on the device, computed as ``sample_ddim`` computes them (float64
        on the host, the parametrization folded in, then float32, or float64 for float64 data)."""
        c_x, c_x0, c_noise = ddim_coefficients(self.schedule, ts[:-1], ts[1:], self.eta)
        c_pred = c_x0
        if self.prediction != "x0":
            a, b = conversion_coefficients(self.schedule, ts[:-1], self.prediction, "x0")
            c_x, c_pred = c_x + c_x0 * a, c_x0 * b
        table_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self._c_x, self._c_pred, self._c_noise = (_aligned(c, self.device, table_dtype) for c in (c_x, c_pred, c_noise))
        self._t_model = ts.to(device=self.device, dtype=self.dtype)
        self._noisy = self.eta > 0

    def _predict(self, x: Tensor, i: int) -> Tensor:
        t = self._t_model[i].expand(x.shape[0])
        out = self.model(x, t, **self.model_kwargs)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the model returned {got} for x of shape {tuple(x.shape)}; it must match")
        # The fused update reads flat memory: a channels-last or sliced output is made dense.
        return out.to(x.dtype).contiguous()

    def _loop(self, steps: Sequence[int] | range) -> Tensor:
        """The sampling loop on the static buffer: prediction, then one fused update in place."""
        x = self._x
        # One autocast region for the whole loop: its cache casts each weight once per run.
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else nullcontext())
        with amp:
            for i in steps:
                pred = self._predict(x, i)
                noise = self._c_noise[i, 0] if self._noisy else None
                affine_step(x, pred, self._c_x[i, 0], self._c_pred[i, 0], noise, generator=self.generator, out=x)
        return x

    def _capture(self, warmup_steps: int) -> None:
        """Warm up on a side stream (compiling and autotuning every kernel, eagerly), then capture
        the whole loop into one graph."""
        with torch.inference_mode():
            self._x.normal_(generator=self.generator)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._loop(range(min(warmup_steps, self.n)))
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.generator is not None and hasattr(graph, "register_generator_state"):
                graph.register_generator_state(self.generator)  # its noise moves on at each replay
            with torch.cuda.graph(graph):
                self._out = self._loop(range(self.n))
        self.graph, self.graphed = graph, True

    def __call__(self, noise: Tensor | None = None, *, copy: bool = True) -> Tensor:
        with torch.inference_mode():
            if noise is None:
                self._x.normal_(generator=self.generator)
            else:
                if not isinstance(noise, Tensor) or tuple(noise.shape) != self.shape:
                    got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
                    raise ValueError(f"noise must be a tensor of the sampler's shape {self.shape}; got {got}")
                self._x.copy_(noise)
            if self.graphed:
                self.graph.replay()
                out = self._out
            else:
                out = self._loop(range(self.n))
            return out.clone() if copy else out


def fast_sampler(
    model: Callable[..., Tensor],
    schedule: Schedule,
    ts: Tensor | Sequence[float],
    shape: Sequence[int],
    *,
    eta: float = 0.0,
    prediction: str = "x0",
    model_kwargs: Mapping[str, object] | None = None,
    generator: torch.Generator | int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    amp_dtype: torch.dtype | str | None = _AUTO,
    channels_last: bool | str = _AUTO,
    graph: bool | str = _AUTO,
    warmup_steps: int = 2,
) -> FastSampler:
    r"""Prepare DDIM sampling of ``shape`` on ``ts`` (Song et al. 2021, eq. 12): each step
    $x_{t_{i+1}} = \alpha_{t_{i+1}}\hat x_0 + \sqrt{\sigma_{t_{i+1}}^2 - c_i^2}\,\hat\varepsilon
    + c_i z$ with $c_i$ from $\eta$ (see {py:func}`stepdiff.samplers.ddim_coefficients`),
    replayed from one CUDA graph on a GPU; the module docstring says what is fused and reused.

    - ``model(x, t, **model_kwargs)`` returns ``prediction`` (``"x0"``, ``"eps"``, ``"v"``,
      ``"score"``, ``"velocity"``) for ``x [B, ...]`` and ``t [B]``; put it in eval mode first
      (dropout). Tensors in ``model_kwargs`` (class labels, a context) are fixed for every
      call; under capture their values are not checked again.
    - ``ts``: the grid, from noise to data (see {py:func}`stepdiff.schedules.time_grid`).
    - ``shape``: the batch ``[B, ...]``; ``dtype``: the sampler's state (float32 by default).
    - ``generator``: the noise of $x_{t_0}$ when a call passes none, and of the steps when
      ``eta > 0``; an int seeds a new generator once (so successive calls draw new noise).
    - ``device``: default the model's parameters' device (CPU for a parameterless callable).
    - ``amp_dtype``: the model runs under ``torch.autocast`` to this dtype; ``"auto"``:
      bfloat16 on CUDA, none elsewhere.
    - ``channels_last``: convert the model to channels-last memory format in place (it needs
      ``set_channels_last``, as the package's UNet has); ``"auto"``: on CUDA, for a model that
      has it.
    - ``graph``: capture one CUDA graph (CUDA only); ``"auto"``: on CUDA. The first
      ``warmup_steps`` steps run eagerly before the capture (every step has the same shapes, so
      one compiles every kernel; the result of the warm-up is discarded).

    With everything off (the defaults on a CPU) a call computes what
    ``sample_ddim(model, noise, schedule, ts, eta=eta, prediction=prediction, generator=...)``
    computes, bit for bit (the model called with ``model_kwargs``).
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t); got {type(model).__name__}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"eta must be a number >= 0; got {eta!r}")
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints [B, ...]; got {shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"shape must be [B, ...] with every size at least 1; got {list(shape)}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype; got {dtype!r}")
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a mapping of keyword arguments; got {type(model_kwargs).__name__}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"warmup_steps must be a positive int; got {warmup_steps!r}")
    if device is None:
        first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ts = _grid(ts)
    cuda = device.type == "cuda"
    if amp_dtype == _AUTO:
        amp_dtype = torch.bfloat16 if cuda else None
    elif amp_dtype is not None and not (isinstance(amp_dtype, torch.dtype) and amp_dtype.is_floating_point):
        raise TypeError(f"amp_dtype must be a floating-point torch.dtype, 'auto' or None; got {amp_dtype!r}")
    has_layout = callable(getattr(model, "set_channels_last", None))
    if channels_last == _AUTO:
        channels_last = cuda and has_layout
    elif not isinstance(channels_last, bool):
        raise ValueError(f"channels_last must be True, False or 'auto'; got {channels_last!r}")
    elif channels_last and not has_layout:
        raise ValueError(f"channels_last=True needs a model with set_channels_last (the package's UNet); "
                         f"got {type(model).__name__}")
    if graph == _AUTO:
        graph = cuda
    elif not isinstance(graph, bool):
        raise ValueError(f"graph must be True, False or 'auto'; got {graph!r}")
    elif graph and not cuda:
        raise ValueError(f"graph=True needs a CUDA device; the sampler runs on {device}")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator(device=device).manual_seed(generator)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None; got {type(generator).__name__}")
    elif generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the sampler runs on {device}")
    return FastSampler(model, schedule, ts, shape, eta=float(eta), prediction=prediction, model_kwargs=model_kwargs,
                       generator=generator, device=device, dtype=dtype, amp_dtype=amp_dtype,
                       channels_last=channels_last, graph=graph, warmup_steps=warmup_steps)


def _aligned(c: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A coefficient table ``[n]`` as ``[n, 4]`` on the device, the values in column 0: each step's
    coefficient ``table[i, 0]`` then starts 16-byte aligned (for float32), so every step launches
    the same specialization of the fused kernel (Triton specializes on pointer alignment), and
    the warm-up's steps compile all of them before the capture."""
    table = torch.zeros(c.shape[0], 4, device=device, dtype=dtype)
    table[:, 0] = c.to(device=device, dtype=dtype)
    return table


def _grid(ts) -> Tensor:
    """The grid as float64 on the host, checked as the samplers check it."""
    ts = torch.as_tensor(ts).detach().to("cpu", torch.float64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"the time grid must be 1-D with at least 2 entries (n_steps >= 1); "
                         f"got shape {tuple(ts.shape)}")
    if bool((ts < 0).any()) or bool((ts > 1).any()):
        raise ValueError(f"grid times must lie in [0, 1]; got [{float(ts.min())}, {float(ts.max())}]")
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError("the time grid must be strictly decreasing (from noise to data)")
    if float(ts[-1]) != 0.0:
        raise ValueError(f"the time grid must end at t = 0 (the data); it ends at {float(ts[-1])}")
    return ts
