"""The fast sampling path (stepdiff.fast) on the CPU: the eager fallback of the CUDA-graph loop.

Without CUDA the loop that a GPU captures runs eagerly, and with the CPU defaults (no autocast,
no layout change) it must compute exactly what sample_ddim computes: these tests hold it to
that, bit for bit, for a UNet and a class-conditional DiT, deterministic and stochastic DDIM,
and several parametrizations. The graph itself (replay against the eager loop, memory across
replays) is tested on a GPU in tests/gpu/test_fast_gpu.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from stepdiff.fast import FastSampler, fast_sampler
from stepdiff.models import DiT, DiTConfig, UNet, UNetConfig
from stepdiff.samplers import sample_ddim
from stepdiff.schedules import FlowMatchingSchedule, VPCosineSchedule, VPLinearSchedule, time_grid

UNET = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), heads=2, norm_groups=4)
DIT = dict(hidden=16, depth=2, heads=2, patch_size=2, freq_dim=32, n_classes=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for the zero-initialised parameters, so that the network's output matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _unet(**changes) -> UNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _perturbed(UNet(UNetConfig(**{**UNET, **changes})))


@pytest.mark.parametrize("eta, prediction, schedule", [
    (0.0, "eps", VPLinearSchedule()),
    (0.0, "v", VPCosineSchedule()),
    (0.7, "x0", VPLinearSchedule()),
    (1.0, "eps", VPCosineSchedule()),
], ids=["ddim-eps", "ddim-v", "eta0.7-x0", "ddpm-eps"])
def test_cpu_fallback_equals_sample_ddim_for_a_unet(eta, prediction, schedule):
    model = _unet()
    ts = time_grid(7, schedule=schedule, t_max=0.98)
    shape = (3, 3, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    kept = noise.clone()
    fast = fast_sampler(model, schedule, ts, shape, eta=eta, prediction=prediction,
                        generator=torch.Generator().manual_seed(2))
    assert isinstance(fast, FastSampler) and not fast.graphed
    got = fast(noise)
    with torch.inference_mode():
        want = sample_ddim(model, noise, schedule, ts, eta=eta, prediction=prediction,
                           generator=torch.Generator().manual_seed(2))
    assert torch.equal(got, want)
    assert torch.equal(noise, kept)  # the caller's noise is copied, not overwritten
    assert want.abs().max() > 0.1  # a real sample, not a zero network's
    if eta == 0:  # deterministic: a second call from the same noise repeats the first
        assert torch.equal(fast(noise), got)
    else:  # the generator moved on: new noise in the steps
        assert not torch.equal(fast(noise), got)


def test_cpu_fallback_equals_sample_ddim_for_a_class_conditional_dit():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = _perturbed(DiT(DiTConfig(**DIT)))
    schedule = FlowMatchingSchedule()
    ts = time_grid(5)
    y = torch.tensor([0, 2, 3])  # 3 is the null class
    shape = (3, 3, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    fast = fast_sampler(model, schedule, ts, shape, prediction="velocity", model_kwargs={"y": y})
    with torch.inference_mode():
        want = sample_ddim(lambda x, t: model(x, t, y=y), noise, schedule, ts, prediction="velocity")
    assert torch.equal(fast(noise), want)


def test_noise_drawn_from_the_generator_and_the_static_buffer():
    """Without noise a call draws x_T from the generator (an int seeds it once: two samplers with
    one seed agree, successive calls differ); copy=False hands out the static buffer itself."""
    model = _unet()
    schedule = VPLinearSchedule()
    ts = time_grid(4, schedule=schedule, t_max=0.98)
    shape = (2, 3, 8, 8)
    a = fast_sampler(model, schedule, ts, shape, prediction="eps", generator=7)
    b = fast_sampler(model, schedule, ts, shape, prediction="eps", generator=7)
    first, again = a(), b()
    assert torch.equal(first, again)
    assert not torch.equal(a(), first)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, a(x_T))  # the first draw was this x_T
    buffer = a(x_T, copy=False)
    assert a(torch.zeros(shape), copy=False) is buffer and not torch.equal(buffer, first)


def test_channels_last_and_autocast_on_the_cpu():
    """Asked for on the CPU, channels-last (the UNet converted in place) gives sample_ddim's result
    to float32 rounding, and bf16 autocast to bf16 accuracy (1-2 % through the network)."""
    model = _unet()
    schedule = VPCosineSchedule()
    ts = time_grid(4, schedule=schedule, t_max=0.98)
    shape = (2, 3, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = sample_ddim(model, noise, schedule, ts, prediction="eps")
    fast = fast_sampler(model, schedule, ts, shape, prediction="eps", channels_last=True)
    assert model.channels_last
    torch.testing.assert_close(fast(noise), want, rtol=1e-4, atol=1e-5)
    model.set_channels_last(False)
    amp = fast_sampler(model, schedule, ts, shape, prediction="eps", amp_dtype=torch.bfloat16)
    out = amp(noise)
    assert out.dtype == torch.float32
    assert float((out - want).norm() / want.norm()) < 0.03


def test_bad_arguments_are_named():
    model = _unet()
    schedule = VPLinearSchedule()
    ts = time_grid(3, schedule=schedule, t_max=0.98)
    shape = (2, 3, 8, 8)
    with pytest.raises(ValueError, match="graph=True needs a CUDA device"):
        fast_sampler(model, schedule, ts, shape, graph=True)
    with pytest.raises(ValueError, match="channels_last=True needs a model with set_channels_last"):
        fast_sampler(lambda x, t: x, schedule, ts, shape, channels_last=True)
    with pytest.raises(ValueError, match="eta must be a number >= 0"):
        fast_sampler(model, schedule, ts, shape, eta=-0.1)
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        fast_sampler(model, schedule, ts, shape, prediction="noise")
    with pytest.raises(ValueError, match="strictly decreasing"):
        fast_sampler(model, schedule, [0.5, 0.7, 0.0], shape)
    with pytest.raises(ValueError, match="shape must be"):
        fast_sampler(model, schedule, ts, (0, 3, 8, 8))
    with pytest.raises(TypeError, match="model must be callable"):
        fast_sampler("unet", schedule, ts, shape)
    with pytest.raises(TypeError, match="model_kwargs must be a mapping"):
        fast_sampler(model, schedule, ts, shape, model_kwargs=[1])
    fast = fast_sampler(model, schedule, ts, shape)
    with pytest.raises(ValueError, match=r"sampler's shape \(2, 3, 8, 8\); got \(1, 3, 8, 8\)"):
        fast(torch.zeros(1, 3, 8, 8))
    wrong = fast_sampler(lambda x, t: x[:1], schedule, ts, shape)
    with pytest.raises(ValueError, match="the model returned"):
        wrong()


def test_warm_up_builds_every_kernel_plan_the_loop_launches(monkeypatch):
    """Nothing can compile during CUDA-graph capture, so the eager warm-up steps before it must
    meet every kernel specialization of the loop. With the Triton kernels forced (the interpreter
    on a CPU: attention, GroupNorm+SiLU, the fused update), the first two steps create every plan
    (each keyed by what its kernel specializes on) that the remaining steps use; and the loop on
    the kernels gives the reference loop's samples to float32 rounding: against the loop in float64,
    its error is at most a few times the float32 reference loop's own."""
    import importlib

    tables = [importlib.import_module(f"stepdiff.kernels.{name}") for name in
              ("fused", "norm_triton", "attention", "attention_triton")]
    model = _unet()
    schedule = VPLinearSchedule()
    ts = time_grid(6, schedule=schedule, t_max=0.98)
    shape = (2, 3, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    want = fast_sampler(model, schedule, ts, shape, prediction="eps")(noise)
    exact = fast_sampler(copy.deepcopy(model).double(), schedule, ts, shape, prediction="eps",
                         dtype=torch.float64)(noise.double())
    monkeypatch.setenv("STEPDIFF_BACKEND", "triton")
    fast = fast_sampler(model, schedule, ts, shape, prediction="eps")
    plans = [tables[0]._PUBLIC_PLANS, tables[1]._PLANS, tables[2]._INFERENCE_PLANS, tables[3]._PLANS]
    fast._x.copy_(noise)
    with torch.inference_mode():
        fast._loop(range(2))  # the warm-up that precedes the capture
        after_warm_up = [set(table) for table in plans]
        fast._loop(range(2, fast.n))
    assert all(after_warm_up)  # every kernel family was planned
    assert [set(table) - keys for table, keys in zip(plans, after_warm_up, strict=True)] == [set()] * len(plans)
    # The samples reach a few hundred, and six steps from t = 0.98 amplify rounding, so a fixed atol
    # is the wrong scale: a small element differed by 1.5e-5 from the float32 reference on a Xeon
    # with AMX. The scale is the float32 reference loop's own error against float64.
    reference_error = (want.double() - exact).abs().max()
    assert 0 < reference_error < 1e-5 * exact.abs().max()  # float32 rounding, not a wrong loop
    assert (fast(noise).double() - exact).abs().max() <= 4 * reference_error
