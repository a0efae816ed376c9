"""ControlNet: exact equality with the base at initialisation, a base that training never changes,
control that is followed once trained, and clear errors for a control map that does not fit."""

import pytest
import torch

from stepdiff.models import UNet, UNetConfig
from stepdiff.models.controlnet import (
    ControlNet,
    ControlNetConfig,
    controlnet_loss,
    mask_iou,
    object_mask_from_image,
    packed_loss_fn,
)
from stepdiff.schedules import VPCosineSchedule
from stepdiff.shapes import make_shapes
from stepdiff.train import train

torch.set_num_threads(1)


def _trained_like_base(**changes) -> UNet:
    """A small UNet whose zero-initialised layers are made non-zero, as training leaves them."""
    torch.manual_seed(0)
    config = UNetConfig.preset("tiny", channels=16, channel_mult=(1, 2), attn_levels=(1,), heads=2, **changes)
    base = UNet(config)
    with torch.no_grad():
        for p in base.parameters():
            if not bool(p.any()):
                p.normal_(0.0, 0.05)
    return base


def _controls(batch: int, channels: int = 1, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("conditioning", ["none", "class", "context", "channels_last"])
def test_at_initialisation_the_output_is_the_base_output_bit_for_bit(conditioning):
    kwargs, extra = ({"channels_last": True} if conditioning == "channels_last" else {}), {}
    if conditioning == "class":
        kwargs, extra = {"n_classes": 4}, {"y": torch.tensor([0, 3, 4])}
    elif conditioning == "context":
        kwargs = {"context_dim": 8}
        extra = {"context": torch.randn(3, 5, 8), "context_mask": torch.tensor([[True] * 5, [True] * 2 + [False] * 3,
                                                                                [True] * 4 + [False]])}
    base = _trained_like_base(**kwargs)
    net = ControlNet(base, hint_channels=2)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 0.5, 0.93])
    with torch.no_grad():
        ref = base(x, t, **extra)
        assert ref.abs().max() > 0.01  # a base that says something
        for seed in range(3):
            out = net(x, t, **extra, control=10 * _controls(3, 2, seed=seed) - 5)
            assert torch.equal(out, ref)


def test_the_base_is_frozen_and_the_copy_starts_from_its_weights():
    base = _trained_like_base()
    net = ControlNet(base)
    assert all(not p.requires_grad for p in net.base.parameters())
    assert net.base is base
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("base.") for n in trainable)
    assert net.num_parameters() == sum(p.numel() for p in net.parameters() if p.requires_grad)
    for name in ("conv_in", "time_embed", "down", "mid"):
        ours, theirs = getattr(net, name).state_dict(), getattr(base, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(not bool(p.any()) for p in net.zero_convs.parameters())
    assert all(not bool(p.any()) for p in net.zero_mid.parameters())
    net.train()
    assert net.training and not net.base.training


def test_gradients_reach_the_zero_convolutions_first_and_never_the_base():
    base = _trained_like_base()
    net = ControlNet(base)
    x0, control = torch.rand(4, 3, 8, 8) * 2 - 1, _controls(4)
    loss = controlnet_loss(net, x0, control, VPCosineSchedule(), generator=torch.Generator().manual_seed(0),
                           t_max=0.99)
    loss.backward()
    assert all(p.grad is None for p in net.base.parameters())
    assert all(p.grad is not None and bool(p.grad.any()) for p in net.zero_convs.parameters())
    assert net.zero_mid.weight.grad.abs().max() > 0
    # Behind the zero convolutions nothing moves yet: the copy's and the hint's gradients are exactly zero.
    assert not bool(net.conv_in.weight.grad.any()) and not bool(net.hint.net[-1].weight.grad.any())


def test_after_training_the_base_is_unchanged_and_the_control_is_used():
    base = _trained_like_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    net = ControlNet(base)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 8, 8, generator=g) * 2 - 1
    controls = (images[:, :1] > 0).float()  # a control map that says something about the image
    data = torch.cat([images, controls], 1)
    result = train(net, data, loss_fn=packed_loss_fn(VPCosineSchedule(), 3, t_max=0.99), steps=6, batch_size=8,
                   lr=1e-3, seed=0)
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(a, b) for a, b in zip(result.ema.model.base.state_dict().values(), before.values()))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        a, b = net(x, t, control=_controls(2, seed=5)), net(x, t, control=_controls(2, seed=6))
        ref = base(x, t)
        assert not torch.allclose(a, b) and not torch.allclose(a, ref)
        assert torch.equal(net(x, t, control=_controls(2, seed=5), scale=0.0), ref)
        assert net.zero_convs[0].weight.abs().max() > 0 and net.hint.net[-1].weight.abs().max() > 0


def test_the_residuals_enter_the_skip_connections_and_the_middle_only():
    """With non-zero zero convolutions: the way down of the base is untouched, the middle's output gains
    Z_mid(m_copy), and the skip half of every up stage's input gains its Z_i(h_copy_i), last-first."""
    base = _trained_like_base()
    net = ControlNet(base)
    with torch.no_grad():
        for p in [*net.zero_convs.parameters(), *net.zero_mid.parameters(), *net.hint.parameters()]:
            p.normal_(0.0, 0.1)
    x, t, control = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 0.7]), _controls(2)
    seen: dict[str, list] = {"down": [], "up": []}
    hooks = [stage.register_forward_hook(lambda m, a, out: seen["down"].append(out)) for stage in base.down]
    hooks += [stage[0].register_forward_pre_hook(lambda m, a: seen["up"].append(a[0])) for stage in base.up]
    with torch.no_grad():
        base(x, t)
        down0, up0 = seen["down"], seen["up"]
        seen["down"], seen["up"] = [], []
        net(x, t, control=control, scale=0.5)
        down1, up1 = seen["down"], seen["up"]
        skips, mid = net.residuals(x, t, None, None, None, control)
    for h in hooks:
        h.remove()
    assert all(torch.equal(a, b) for a, b in zip(down0, down1))
    assert len(up1) == len(skips) == len(base.up)
    for j, r in enumerate(reversed(skips)):
        C = r.shape[1]
        torch.testing.assert_close(up1[j][:, -C:] - up0[j][:, -C:], 0.5 * r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(up1[0][:, : mid.shape[1]] - up0[0][:, : mid.shape[1]], 0.5 * mid, rtol=1e-5, atol=1e-6)
    assert all(r.abs().max() > 0 for r in skips) and mid.abs().max() > 0
    assert not base.mid._forward_hooks and not any(s._forward_pre_hooks for s in base.up)  # nothing left behind


def test_bind_and_shapes():
    net = ControlNet(_trained_like_base(in_channels=1), ControlNetConfig(hint_channels=1, hint_widths=(8,)))
    control = _controls(5, size=16)
    model = net.bind(control)
    x = torch.randn(5, 1, 16, 16)
    out = model(x, torch.full((5,), 0.4))
    assert out.shape == x.shape and out.dtype == x.dtype


def test_bind_repeats_the_control_for_guidance():
    """Classifier-free guidance stacks conditional and unconditional rows; the bound control map follows."""
    from stepdiff.guidance import ClassifierFreeGuidance

    net = ControlNet(_trained_like_base(n_classes=3))
    with torch.no_grad():
        for p in [*net.zero_convs.parameters(), *net.zero_mid.parameters(), *net.hint.parameters()]:
            p.normal_(0.0, 0.1)
    control, x, t = _controls(2), torch.randn(2, 3, 8, 8), torch.tensor([0.4, 0.4])
    y = torch.tensor([0, 2])
    with torch.no_grad():
        guided = ClassifierFreeGuidance(net.bind(control), 2.0, y=y, null=net.null_class)(x, t)
        cond, uncond = net(x, t, y, control=control), net(x, t, torch.full((2,), 3), control=control)
    torch.testing.assert_close(guided, uncond + 2.0 * (cond - uncond), rtol=1e-5, atol=1e-6)


def test_bad_control_maps_and_bases():
    net = ControlNet(_trained_like_base(), hint_channels=1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.6])
    with pytest.raises(ValueError, match="control has 3 channels but this ControlNet takes hint_channels=1"):
        net(x, t, control=torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="control must have the batch size and image size of x"):
        net(x, t, control=torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="control must have the batch size and image size of x"):
        net(x, t, control=torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match="control must be a float control map"):
        net(x, t, control=torch.ones(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="control must be a float control map"):
        net(x, t, control=torch.rand(2, 8, 8))
    with pytest.raises(TypeError, match="control"):
        net(x, t)
    with pytest.raises(TypeError, match="base must be a stepdiff UNet"):
        ControlNet(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="hint_channels"):
        ControlNetConfig(hint_channels=0)
    with pytest.raises(ValueError, match="the data must be"):
        packed_loss_fn(VPCosineSchedule(), 3)(net, torch.rand(2, 3, 8, 8), None, torch.Generator())


def test_object_mask_estimate_on_real_shapes_and_iou():
    data = make_shapes(200, seed=3, size=32)
    truth = data.masks.sum(1, keepdim=True) > 0.5
    iou = mask_iou(object_mask_from_image(data.images), truth)
    assert iou.shape == (200,) and float(iou.mean()) > 0.9
    # Another scene's objects are not these: the IoU of a mismatched pair is low.
    assert float(mask_iou(object_mask_from_image(data.images), truth.roll(1, 0)).mean()) < 0.2
    a = torch.zeros(3, 1, 2, 2, dtype=torch.bool)
    b = a.clone()
    a[0, 0, 0, 0] = b[0, 0, 0, 0] = True
    a[1, 0, 0] = True
    b[1, 0, :, 0] = True
    assert mask_iou(a, b).tolist() == pytest.approx([1.0, 1 / 3, 1.0])
    with pytest.raises(ValueError, match="images"):
        object_mask_from_image(torch.zeros(2, 1, 4, 4))


# --- a ControlNet run of the stepdiff command -------------------------------------------------------

TINY_UNET = {"arch": "unet", "preset": "tiny", "channels": 8, "channel_mult": [1, 2], "attn_levels": [1], "heads": 2,
             "norm_groups": 4, "text": {"dim": 16, "depth": 1, "heads": 2}}
SHAPES16 = {"name": "shapes", "size": 16, "condition": "text", "n": 48, "n_objects": [1, 2]}


@pytest.mark.parametrize("control", ["mask", "edges"])
def test_controlnet_runs_through_the_command_and_leaves_the_base_alone(tmp_path, control):
    from stepdiff import checkpoints
    from stepdiff.models.controlnet import TextControlNet
    from stepdiff.runs import train_run

    train_run({"name": "base", "data": SHAPES16, "model": TINY_UNET,
               "train": {"steps": 2, "batch_size": 8, "threads": 1, "label_dropout": 0.1}}, tmp_path / "base.pt")
    base, _ = checkpoints.load(tmp_path / "base.pt")
    cfg = {"kind": "controlnet", "name": "cn", "base": {"model": str(tmp_path / "base.pt")}, "data": SHAPES16,
           "model": {"control": control, "hint_widths": [8]},
           "train": {"steps": 3, "batch_size": 8, "threads": 1, "label_dropout": 0.1}}
    result = train_run(cfg, tmp_path / "cn.pt")
    assert len(result.losses) == 3
    net, record = checkpoints.load(tmp_path / "cn.pt")
    assert isinstance(net, TextControlNet) and record["kind"] == "controlnet"
    for weights in (net.text.state_dict(), checkpoints.load(tmp_path / "cn.pt", ema=False)[0].text.state_dict()):
        assert all(torch.equal(weights[k], v) for k, v in base.state_dict().items())
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 0.5)
    tokens = torch.ones(2, 3, dtype=torch.long)
    with torch.no_grad():
        assert net(x, t, tokens, control=torch.rand(2, 1, 16, 16)).shape == x.shape


def test_controlnet_configuration_errors():
    from stepdiff.config import ConfigError, resolve

    base = {"model": "somewhere.pt"}
    with pytest.raises(ConfigError, match="control"):
        resolve({"kind": "controlnet", "base": base, "data": SHAPES16, "model": {"control": "depth"}})
    with pytest.raises(ConfigError, match="shapes"):
        resolve({"kind": "controlnet", "base": base, "data": {"name": "digits"}})
    with pytest.raises(ConfigError, match="hint_widths"):
        resolve({"kind": "controlnet", "base": base, "data": SHAPES16, "model": {"hint_widths": [0]}})
    assert resolve({"kind": "controlnet", "base": base, "data": SHAPES16})["model"]["control"] == "mask"


def test_a_bound_text_controlnet_is_guided_like_its_base():
    """ClassifierFreeGuidance reads the null caption and the padding id off the bound ControlNet, as off
    the base: a null row shorter than the captions is right-padded, and the guided output is
    uncond + w (cond - uncond) with the unconditional branch on the padded empty caption."""
    from stepdiff.guidance import ClassifierFreeGuidance
    from stepdiff.models.controlnet import controlnet_for
    from stepdiff.models.text import TextConditioned, TextEncoder
    from stepdiff.text import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer()
    encoder = TextEncoder(tok.vocab_size, dim=16, depth=1, heads=2, pad_id=tok.pad_id)
    base = TextConditioned(_trained_like_base(context_dim=16), encoder, tok.pad_id, tok.empty(1)[0]).eval()
    net = controlnet_for(base, ControlNetConfig(hint_channels=1, hint_widths=(8,)))
    with torch.no_grad():
        for p in net.controlnet.zero_convs.parameters():
            p.normal_(0.0, 0.1)
    ids = tok.encode(["a red circle at the top left", "a small blue square"])
    assert ids.shape[1] > base.null_ids.shape[-1]  # the case that needs padding
    control, x, t = _controls(2), torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        guided = ClassifierFreeGuidance(net.bind(control), 3.0, y=ids)(x, t)
        cond = net(x, t, ids, control=control)
        uncond = net(x, t, tok.empty(2, ids.shape[1]), control=control)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_an_exported_controlnet_holds_only_its_adapter_and_reloads_only_on_its_own_base(tmp_path):
    """The export keeps the trained adapter only; loading rebuilds the base from where the record
    says and refuses a base that is not, bit for bit, the one trained with; the export refuses a
    checkpoint whose frozen base has moved."""
    from stepdiff import checkpoints
    from stepdiff.runs import train_run

    train_run({"name": "base", "data": SHAPES16, "model": TINY_UNET,
               "train": {"steps": 2, "batch_size": 8, "threads": 1, "label_dropout": 0.1}}, tmp_path / "base.pt")
    cfg = {"kind": "controlnet", "name": "cn", "base": {"model": str(tmp_path / "base.pt")}, "data": SHAPES16,
           "model": {"control": "mask", "hint_widths": [8]},
           "train": {"steps": 3, "batch_size": 8, "threads": 1, "label_dropout": 0.1}}
    train_run(cfg, tmp_path / "cn.pt")
    weights_path, _ = checkpoints.export(tmp_path / "cn.pt", tmp_path / "out")
    stored = torch.load(weights_path, weights_only=True)
    assert stored and not any(k.startswith(("text.", "controlnet.base.")) for k in stored)
    trained, _ = checkpoints.load(tmp_path / "cn.pt")
    exported, record = checkpoints.load(weights_path)
    assert record["weights"]["base_sha256"]
    got, want = exported.state_dict(), trained.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():  # the adapter as exported (float16); the base as its own file holds it
        assert torch.equal(got[k], v if k.startswith(("text.", "controlnet.base.")) else v.half().float()), k

    moved = torch.load(tmp_path / "cn.pt", weights_only=True)  # the frozen base changed in training
    moved["model"]["text.denoiser.conv_in.weight"] += 1e-3
    torch.save(moved, tmp_path / "moved.pt")
    with pytest.raises(ValueError, match="frozen base differs"):
        checkpoints.export(tmp_path / "moved.pt", tmp_path / "out2")
    assert not (tmp_path / "out2" / "cn.pt").exists()

    base = torch.load(tmp_path / "base.pt", weights_only=True)  # the base file replaced afterwards
    for state in (base["model"], base["ema"]["model"]):
        state["denoiser.conv_in.weight"] += 1e-2
    torch.save(base, tmp_path / "base.pt")
    with pytest.raises(ValueError, match="not the one it was trained with"):
        checkpoints.load(weights_path)
