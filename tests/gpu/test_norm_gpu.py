"""The fused GroupNorm+SiLU and adaLN kernels compiled on a GPU: bf16, large sizes, graphs.

Skipped without CUDA (tests/conftest.py). The checks and the bound are those of
tests/kernels/test_norm.py (against float64 PyTorch, with PyTorch in the input dtype held to
the same bound); there the kernels run in the interpreter at small sizes in fp32 and fp16.
On the GPU the kernels' ``exp`` is the hardware's approximation (relative error about
$2^{-22}$, a few $u_{32}$), well inside $K u_{32}$ with $K = 32$.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from stepdiff.kernels import adaln_modulate, group_norm_silu

_spec = importlib.util.spec_from_file_location("norm_checks", Path(__file__).parents[1] / "kernels" / "test_norm.py")
norm_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(norm_checks)

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", [
    ((16, 256, 32, 32), 32, False),  # ddpm-cifar's widest block at 32x32
    ((16, 256, 32, 32), 32, True),  # the same, channels-last
    ((4, 128, 64, 64), 32, False),  # 16384 values per group: many tiles
    ((3, 96, 17, 19), 3, True),  # odd sizes, 32 channels per group
    ((2, 640, 9, 7), 1, False),  # one group of 640 channels: tiles over channels
], ids=["cifar32", "cifar32-cl", "big-groups", "odd-cl", "one-group"])
def test_group_norm_silu_matches_float64(case, dtype):
    shape, groups, channels_last = case
    g = _gen(sum(shape))
    x = (3 * torch.randn(shape, generator=g) + 2).to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (1 + 0.5 * torch.randn(shape[1], generator=g)).to(DEVICE, dtype)
    b = (0.5 * torch.randn(shape[1], generator=g)).to(DEVICE, dtype)
    y = norm_checks.check_group_norm_silu(x, groups, w, b)[0]
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(8, 1024, 768), (4, 4096, 1152), (3, 77, 72), (2, 5, 4096)],
                         ids=["dit-b-1024", "dit-xl-4096", "odd", "wide"])
def test_adaln_modulate_matches_float64(shape, dtype):
    B, L, D = shape
    g = _gen(B + L + D)
    x = (2 * torch.randn(B, L, D, generator=g) + 1).to(DEVICE, dtype)
    shift, scale = (0.5 * torch.randn(B, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    norm_checks.check_adaln(x, shift, scale)


def test_inference_paths_and_graph_capture():
    """Without gradients the kernels run without autograd, give the autograd path's numbers,
    and can be captured in a CUDA graph (the replay recomputes from the current inputs)."""
    x = torch.randn(8, 128, 16, 16, device=DEVICE, dtype=torch.bfloat16)
    w, b = torch.randn(128, device=DEVICE), torch.randn(128, device=DEVICE)
    t = torch.randn(4, 256, 768, device=DEVICE, dtype=torch.bfloat16)
    shift, scale = torch.randn(4, 768, device=DEVICE), torch.randn(4, 768, device=DEVICE)
    with torch.no_grad():
        y1 = group_norm_silu(x, 32, w, b)
        a1 = adaln_modulate(t, shift.bfloat16(), scale.bfloat16())
    y2 = group_norm_silu(x, 32, w.requires_grad_(), b)
    assert torch.equal(y1, y2.detach())
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            group_norm_silu(x, 32, w, b)
            adaln_modulate(t, shift.bfloat16(), scale.bfloat16())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gy = group_norm_silu(x, 32, w, b)
            ga = adaln_modulate(t, shift.bfloat16(), scale.bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(gy, y1) and torch.equal(ga, a1)
        x.mul_(2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(gy, group_norm_silu(x, 32, w, b))
