"""The launch path with little Python (stepdiff/kernels/launch.py and the plans of the kernels).

In the interpreter (no GPU) the plans' bookkeeping is what can be tested: a repeated call reuses
the plan checked on its first call, the checks a plan cannot make once (values that change from
call to call) are still made, a call that differs in a checked property gets a plan of its own
(and its error), and the noise drawn from a generator on the host is the documented stream.
That the plan hands the compiled kernel's launcher exactly what Triton would is checked through
the stand-in driver by benchmarks/host_cost.py (tests/kernels/test_host_cost.py); on a GPU by
tests/gpu/.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from stepdiff.kernels import affine_step, attention, noise_add
from stepdiff.kernels import fused as fused_module
from stepdiff.kernels.reference import philox_normal_reference

ft = pytest.importorskip("stepdiff.kernels.fused_triton")
attention_module = importlib.import_module("stepdiff.kernels.attention")
pytestmark = pytest.mark.skipif(not ft.INTERPRETED, reason="interpreter bookkeeping (GPU: tests/gpu)")
NOISE_TOL = 1e-5


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_a_repeated_call_reuses_its_plan(monkeypatch):
    built = []
    real = ft.affine_step_plan
    monkeypatch.setattr(ft, "affine_step_plan", lambda *a: built.append(1) or real(*a))
    monkeypatch.setattr(fused_module, "_PUBLIC_PLANS", {})
    x, pred = _randn((3, 37), 1), _randn((3, 37), 2)
    c = torch.rand(3, generator=torch.Generator().manual_seed(3))
    first = affine_step(x, pred, c, 0.5, clamp=1.0, backend="triton")
    for _ in range(3):
        again = affine_step(x, pred, c, 0.5, clamp=1.0, backend="triton")
    assert built == [1] and torch.equal(first, again)
    # New values of the same kinds of argument: the same plan, the new values used.
    y = affine_step(x * 2, pred, c * 3, 0.25, clamp=0.5, backend="triton")
    assert built == [1]
    torch.testing.assert_close(y, affine_step(x * 2, pred, c * 3, 0.25, clamp=0.5, backend="torch"),
                               rtol=4 * 2.0**-24, atol=1e-7)
    # Another shape, or a float where a tensor was: a plan of its own.
    affine_step(x[:2], pred[:2], c[:2], 0.5, backend="triton")
    affine_step(x, pred, 0.7, 0.5, backend="triton")
    assert len(built) == 3


def test_values_are_still_checked_on_a_known_plan():
    x = _randn((2, 40), 4)
    affine_step(x, x, 1.0, 1.0, clamp=1.0, backend="triton")
    with pytest.raises(ValueError, match="clamp"):
        affine_step(x, x, 1.0, 1.0, clamp=-1.0, backend="triton")
    affine_step(x, x, 1.0, 1.0, 1.0, seed=5, backend="triton")
    with pytest.raises(ValueError, match="seed and offset"):
        affine_step(x, x, 1.0, 1.0, 1.0, seed=-5, backend="triton")
    noise_add(x, 1.0, 1.0, seed=5, offset=1, backend="triton")
    with pytest.raises(ValueError, match="seed and offset"):
        noise_add(x, 1.0, 1.0, seed=5, offset=-1, backend="triton")


def test_a_call_that_differs_in_a_checked_property_is_refused():
    x, pred = _randn((3, 8), 5), _randn((3, 8), 6)
    affine_step(x, pred, 1.0, 1.0, backend="triton")
    with pytest.raises(ValueError, match="pred must have the shape of x"):
        affine_step(x, pred[:, :4], 1.0, 1.0, backend="triton")
    with pytest.raises(ValueError, match="pred must be contiguous"):
        affine_step(x[:, :4].contiguous(), pred[:, ::2], 1.0, 1.0, backend="triton")
    with pytest.raises(TypeError, match="c_x must be a float or a tensor"):
        affine_step(x, pred, "1", 1.0, backend="triton")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        affine_step([1.0], pred, 1.0, 1.0, backend="triton")


def test_large_seeds_take_their_own_plan():
    """Triton passes an int seed below 2**31 as int32 and a larger one as int64: the plan key
    tells them apart, and both give the documented noise."""
    zero = torch.zeros(2, 300)
    for seed, offset in ((3, 1), (2**40 + 3, 1), (3, 2**33)):
        z = affine_step(zero, zero, 0.0, 0.0, 1.0, seed=seed, offset=offset, backend="triton")
        torch.testing.assert_close(z.double(), philox_normal_reference((2, 300), seed, offset, dtype=torch.float64),
                                   rtol=NOISE_TOL, atol=NOISE_TOL)


class CudaLikeGenerator(torch.Generator):
    """A CPU generator with the host-side Philox offset of a CUDA generator (which this
    machine has not): ``manual_seed`` resets the offset, as it does on a GPU."""

    def __init__(self):
        super().__init__()
        self._offset = 0

    def manual_seed(self, seed):
        self._offset = 0
        return super().manual_seed(seed)

    def get_offset(self):
        return self._offset

    def set_offset(self, offset):
        self._offset = offset


@pytest.fixture
def gpu_like(monkeypatch):
    """CPU data treated as GPU data by the dispatcher (the interpreter runs the kernels), with
    generators as on a GPU, and no device kernel allowed for the seed."""
    monkeypatch.setattr(fused_module, "_on_gpu", lambda x: True)
    monkeypatch.setattr(fused_module, "_capturing", lambda: False)
    monkeypatch.setattr(fused_module, "_check_generator", lambda g, x: None)
    monkeypatch.setattr(fused_module, "_PUBLIC_PLANS", {})

    def no_seed_kernel(*args, **kwargs):
        raise AssertionError("a seed was drawn on the device")

    monkeypatch.setattr(fused_module, "_device_seed", no_seed_kernel)


@pytest.mark.parametrize("call", ["affine_step", "noise_add"])
def test_generator_noise_is_drawn_on_the_host(gpu_like, call):
    """Outside graph capture a generator's noise needs no kernel: key = the generator's seed,
    counter offset = 2**62 + offset / 4; the generator then moves on by 4, so the next call
    draws new noise, and re-seeding it reproduces the draws."""
    g = CudaLikeGenerator()
    g.manual_seed(2024)
    g.set_offset(8)
    zero = torch.zeros(3, 77)

    def draw():
        if call == "affine_step":
            return affine_step(zero, zero, 0.0, 0.0, 1.0, generator=g, backend="triton")
        return noise_add(zero, 1.0, 1.0, generator=g, backend="triton")[1]

    first = draw()
    assert g.get_offset() == 12
    want = philox_normal_reference((3, 77), 2024, 2**62 + 2, dtype=torch.float64)
    torch.testing.assert_close(first.double(), want, rtol=NOISE_TOL, atol=NOISE_TOL)
    second = draw()
    assert g.get_offset() == 16 and not torch.equal(first, second)
    g.manual_seed(2024)
    g.set_offset(8)
    assert torch.equal(draw(), first)


def test_attention_inference_path_equals_the_autograd_path():
    """Without gradients the kernels read [B, L, H, D] tensors through permuted strides (no
    autograd node); the result equals the autograd path's and a repeated call the first."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, L, 3, 24, generator=g) for L in (19, 33, 33))
    lens = torch.tensor([33, 9])
    with torch.no_grad():
        fast = attention(q, k, v, kv_lens=lens, layout="blhd", backend="triton")
        again = attention(q, k, v, kv_lens=lens, layout="blhd", backend="triton")
    assert fast.shape == q.shape and torch.equal(fast, again)
    slow = attention(*(t.requires_grad_() for t in (q, k, v)), kv_lens=lens, layout="blhd",
                     backend="triton")
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)
    ref = attention(q.detach(), k.detach(), v.detach(), kv_lens=lens, layout="blhd", backend="torch")
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    # The checks still run on a known plan for what a plan cannot fix: kv_lens's values.
    with torch.no_grad(), pytest.raises(ValueError, match="kv_lens"):
        attention(q, k, v, kv_lens=torch.tensor([34, 9]), layout="blhd", backend="triton")
