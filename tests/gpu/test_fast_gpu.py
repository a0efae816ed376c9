"""The fast sampling path on a GPU: a whole DDIM run captured in one CUDA graph (skipped without CUDA).

On the CPU (tests/test_fast.py) the loop runs eagerly and equals sample_ddim bit for bit; here
the same loop is captured and replayed, with bf16 autocast, a channels-last UNet and the
package's Triton kernels (attention, GroupNorm+SiLU, adaLN, the fused update). Checked: a replay
equals the same loop run eagerly (graph=False) to bf16 accuracy, and both equal float32
sample_ddim on plain PyTorch to bf16 accuracy; replays allocate nothing; in-place weight
updates are seen by the next replay; with eta > 0 each replay draws new noise, reproducibly.
"""

from __future__ import annotations

import pytest
import torch

from stepdiff.fast import fast_sampler
from stepdiff.models import DiT, DiTConfig, UNet, UNetConfig
from stepdiff.samplers import sample_ddim
from stepdiff.schedules import FlowMatchingSchedule, VPLinearSchedule, time_grid

DEVICE = "cuda"
UNET = dict(channels=64, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), heads=2, norm_groups=16,
            scale_shift=False)
DIT = dict(hidden=128, depth=2, heads=2, patch_size=2, freq_dim=64, n_classes=4)
BF16_RUN = 2e-2  # relative L2 between two bf16 runs of the same loop that may round differently


def _perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.to(DEVICE).eval()


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _reference(make, state, noise, schedule, ts, model_kwargs=None, **kw):
    """float32 sample_ddim with plain PyTorch (SDPA attention, reference norms), NCHW."""
    ref = make(attn_backend="sdpa", norm_backend="torch").to(DEVICE).eval()
    ref.load_state_dict(state)
    with torch.inference_mode():
        return sample_ddim(lambda x, t: ref(x, t, **(model_kwargs or {})), noise, schedule, ts, **kw)


def test_unet_replay_equals_the_eager_loop_and_allocates_nothing():
    torch.manual_seed(0)
    model = _perturbed(UNet(UNetConfig(**UNET)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    schedule = VPLinearSchedule()
    ts = time_grid(20, schedule=schedule, t_max=0.98)
    shape = (8, 3, 32, 32)
    noise = torch.randn(shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    fast = fast_sampler(model, schedule, ts, shape, prediction="eps")
    assert fast.graphed and model.channels_last and fast.amp_dtype == torch.bfloat16
    got = fast(noise)
    eager = fast_sampler(model, schedule, ts, shape, prediction="eps", graph=False)(noise)
    want = _reference(lambda **kw: UNet(UNetConfig(**UNET, **kw)), state, noise, schedule, ts, prediction="eps")
    assert torch.isfinite(got).all() and want.abs().max() > 0.1
    # The same kernels on the same inputs; only library choices inside a capture (cuBLAS, cuDNN)
    # may differ, by bf16 roundings (2^-8 relative) carried through the steps. A wrong buffer,
    # stale weights or a missing step are off by order one.
    assert _rel(got, eager) < BF16_RUN, _rel(got, eager)
    # bf16 keeps 8 significant bits; through the network and 20 steps, a few percent.
    assert _rel(got, want) < 0.05, _rel(got, want)
    torch.cuda.synchronize()
    before = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
    out = fast(noise, copy=False)
    for _ in range(4):
        assert fast(noise, copy=False) is out
    torch.cuda.synchronize()
    assert (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) == before
    assert torch.equal(out, got)  # replays are deterministic
    with torch.no_grad():  # an in-place update of the weights is read by the next replay
        model.conv_out.weight.mul_(2.0)
    moved = fast(noise)
    assert not torch.equal(moved, got)
    assert _rel(moved, fast_sampler(model, schedule, ts, shape, prediction="eps", graph=False)(noise)) < BF16_RUN


def test_class_conditional_dit_with_noise_in_the_steps():
    """eta = 1 (ancestral steps): each replay draws new noise, re-seeding the generator reproduces a
    replay; eta = 0 replays equal the eager loop."""
    torch.manual_seed(1)
    model = _perturbed(DiT(DiTConfig(**DIT)))
    schedule = FlowMatchingSchedule()
    ts = time_grid(10)
    shape = (6, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 4], device=DEVICE)  # 4 is the null class
    g = torch.Generator(DEVICE).manual_seed(3)
    noise = torch.randn(shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(2))
    stochastic = fast_sampler(model, schedule, ts, shape, eta=1.0, prediction="velocity",
                              model_kwargs={"y": y}, generator=g)
    g.manual_seed(5)
    first = stochastic(noise)
    second = stochastic(noise)
    g.manual_seed(5)
    again = stochastic(noise)
    assert torch.isfinite(first).all() and not torch.equal(first, second) and torch.equal(first, again)
    deterministic = fast_sampler(model, schedule, ts, shape, prediction="velocity", model_kwargs={"y": y})
    eager = fast_sampler(model, schedule, ts, shape, prediction="velocity", model_kwargs={"y": y}, graph=False)
    assert _rel(deterministic(noise), eager(noise)) < BF16_RUN
    want = _reference(lambda **kw: DiT(DiTConfig(**DIT, **kw)), model.state_dict(), noise, schedule, ts,
                      model_kwargs={"y": y}, prediction="velocity")
    assert want.abs().max() > 0.1 and _rel(deterministic(noise), want) < 0.05


@pytest.mark.parametrize("batch", [1, 5])
def test_odd_batches(batch):
    torch.manual_seed(2)
    model = _perturbed(UNet(UNetConfig(**UNET)))
    schedule = VPLinearSchedule()
    ts = time_grid(5, schedule=schedule, t_max=0.98)
    shape = (batch, 3, 16, 16)
    noise = torch.randn(shape, device=DEVICE)
    fast = fast_sampler(model, schedule, ts, shape, prediction="eps")
    eager = fast_sampler(model, schedule, ts, shape, prediction="eps", graph=False)
    assert _rel(fast(noise), eager(noise)) < BF16_RUN
