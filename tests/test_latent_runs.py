"""Latent text-to-image through the command: `stepdiff train` runs a diffusion model on a trained
autoencoder's latents ([data] latent) with a trained CLIP's frozen text tower ([model.text] clip),
and sampling decodes the latents. Tiny parts are trained here first, through the same command."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import threads_kept

from stepdiff import checkpoints as ckpt
from stepdiff.config import ConfigError, resolve
from stepdiff.runs import sample_images, train_run

SHAPES16 = ["data.name=shapes", "data.size=16", "data.n=48", "data.n_held_out=32"]
FAST = ["train.batch_size=8", "train.threads=1", "train.lr=3e-3"]


def _train(path, overrides):
    with threads_kept():  # a training run sets its own thread count
        return train_run(None, path, overrides=overrides)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny autoencoder (16x16x3 -> 4x4x4) and a tiny CLIP, each trained for a few steps."""
    root = tmp_path_factory.mktemp("parts")
    ae = _train(root / "ae.pt", ["kind=autoencoder", *SHAPES16, "model.preset=tiny", "train.steps=3", *FAST])
    clip = _train(root / "clip.pt", ["kind=clip", *SHAPES16, "data.condition=text", "data.n_held_out=100",
                                      "model.preset=tiny", "train.steps=3", *FAST])
    return str(ae.path), str(clip.path)


def _ldm(ae, clip, steps=4):
    return ["kind=diffusion", *SHAPES16, "data.condition=text", f"data.latent={ae}", f"model.text.clip={clip}",
            "model.preset=tiny", "model.channels=16", "model.channel_mult=[1, 2]", "model.attn_levels=[1]",
            "model.num_res_blocks=1", "objective.schedule=flow", "objective.prediction=velocity",
            "train.label_dropout=0.2", f"train.steps={steps}", *FAST, "sample.sampler=euler", "sample.steps=3"]


def test_latent_text_model_trains_on_latents_with_the_frozen_clip_text_tower(parts, tmp_path):
    from stepdiff.config import build_data, latent_training_images

    ae_path, clip_path = parts
    run = _train(tmp_path / "ldm.pt", _ldm(ae_path, clip_path))
    assert len(run.losses) == 4 and all(math.isfinite(v) for v in run.losses)
    model, record = ckpt.load(run.path)
    ae, _ = ckpt.load(ae_path)
    clip, _ = ckpt.load(clip_path)
    # The denoiser reads the autoencoder's latents: 4 channels at 4x4, not 3 at 16x16.
    assert model.denoiser.config.in_channels == ae.config.latent_channels == 4
    # The text encoder is the CLIP's text tower, unchanged by training (frozen): equal bit for bit.
    mine, theirs = model.encoder.state_dict(), clip.text_encoder.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # The run trained on the scaled posterior means s * mu(x) of the training images.
    cfg = resolve(record["config"])
    data = build_data(cfg)
    z = latent_training_images(cfg, data.images[:8])
    assert torch.allclose(z, ae.encode(data.images[:8]).mean * ae.scale_factor, atol=1e-6)
    # Its record names the parts by their weights' digests.
    assert record["parts"]["latent"]["source"] == ae_path and record["parts"]["clip"]["source"] == clip_path
    assert record["parts"]["latent"]["step"] == 3
    # Sampling decodes: images of the data's shape, the decoder applied to the sampled latents.
    prompts = ["a red circle at the top left", "a small blue square"]
    images = sample_images(model, cfg, 2, prompts=prompts, guidance=2.0, seed=3)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert torch.equal(images, sample_images(model, cfg, 2, prompts=prompts, guidance=2.0, seed=3))


def test_a_tuned_clip_text_tower_starts_from_clip_and_trains_with_the_unet(parts, tmp_path):
    """[model.text] tune = true: the tower starts as the CLIP's and moves with the UNet; the
    checkpoint carries the moved tower, and loading it gives that tower, not the CLIP's again."""
    from stepdiff.config import build_model

    ae_path, clip_path = parts
    clip, _ = ckpt.load(clip_path)
    theirs = clip.text_encoder.state_dict()
    cfg = resolve(_overrides_to_config(_ldm(ae_path, clip_path) + ["model.text.tune=true"]))
    fresh = build_model(cfg)
    assert all(p.requires_grad for p in fresh.encoder.parameters())
    assert all(torch.equal(v, theirs[k]) for k, v in fresh.encoder.state_dict().items())
    run = _train(tmp_path / "tuned.pt", _ldm(ae_path, clip_path) + ["model.text.tune=true"])
    model, _ = ckpt.load(run.path, ema=False)
    mine = model.encoder.state_dict()
    moved = [k for k in mine if mine[k].is_floating_point() and not torch.equal(mine[k], theirs[k])]
    assert moved, "a tuned tower must change in training"
    state = torch.load(run.path, weights_only=True)["model"]
    assert all(torch.equal(mine[k], state[f"encoder.{k}"]) for k in mine)


def _overrides_to_config(overrides):
    from stepdiff.config import set_value

    raw: dict = {}
    for assignment in overrides:
        set_value(raw, assignment)
    return raw


def test_tune_needs_a_clip_and_a_boolean(parts):
    _, clip_path = parts
    base = {"kind": "diffusion", "data": {"name": "shapes", "size": 16, "condition": "text"}}
    with pytest.raises(ConfigError, match=r"tune = true fine-tunes a CLIP's text tower: it needs \[model.text\] clip"):
        resolve({**base, "model": {"text": {"tune": True}}})
    with pytest.raises(ConfigError, match=r"\[model.text\] tune must be a bool; got 'yes'"):
        resolve({**base, "model": {"text": {"clip": clip_path, "tune": "yes"}}})


def test_sampled_latents_are_decoded_by_the_autoencoder(parts, tmp_path):
    """The images are D(z / s) of the latents the same sampler gives when run by hand."""
    from stepdiff.guidance import ClassifierFreeGuidance
    from stepdiff.samplers import sample
    from stepdiff.schedules import get_schedule, time_grid
    from stepdiff.text import Tokenizer

    ae_path, clip_path = parts
    run = _train(tmp_path / "ldm.pt", _ldm(ae_path, clip_path, steps=2))
    model, record = ckpt.load(run.path)
    cfg = resolve(record["config"])
    ae, _ = ckpt.load(ae_path)
    prompt = ["a green triangle at the bottom"]
    images = sample_images(model, cfg, 1, prompts=prompt, guidance=1.5, seed=7)
    schedule = get_schedule("flow")
    ts = time_grid(3, cfg["sample"]["spacing"], schedule, t_max=cfg["sample"]["t_max"])
    g = torch.Generator().manual_seed(7)
    x = float(schedule.sigma(torch.tensor(float(ts[0]), dtype=torch.float64))) * torch.randn((1, 4, 4, 4), generator=g)
    guided = ClassifierFreeGuidance(model, 1.5, y=Tokenizer().encode(prompt), prediction="velocity", schedule=schedule)
    with torch.inference_mode():
        z0 = sample("euler", guided, x, schedule, ts, prediction="velocity")
        want = ae.decode(z0 / ae.scale_factor)
    torch.testing.assert_close(images, want, rtol=1e-5, atol=1e-5)


def test_latent_and_clip_configuration_errors(parts, tmp_path):
    ae_path, clip_path = parts
    base = {"kind": "diffusion", "data": {"name": "shapes", "size": 16, "condition": "text"}}
    with pytest.raises(ConfigError, match=r"\[data\] latent = .* is a clip model, not a autoencoder model"):
        resolve({**base, "data": {**base["data"], "latent": clip_path}})
    with pytest.raises(ConfigError, match=r"\[model.text\] clip = .* is a autoencoder model, not a clip model"):
        resolve({**base, "model": {"text": {"clip": ae_path}}})
    with pytest.raises(ConfigError, match=r"\[data\] latent = 'no-such-model'"):
        resolve({**base, "data": {**base["data"], "latent": "no-such-model"}})
    with pytest.raises(ConfigError, match=r"needs \[data\] condition = 'text'"):
        resolve({"kind": "diffusion", "data": {"name": "shapes", "size": 16, "condition": "class"},
                 "model": {"text": {"clip": clip_path}}})
    with pytest.raises(ConfigError, match="is a UNet"):
        resolve({**base, "model": {"arch": "dit", "text": {"clip": clip_path}}})
    with pytest.raises(ConfigError, match="encodes 3-channel images; the digits images have 1"):
        resolve({"kind": "diffusion", "data": {"name": "digits", "size": 16, "latent": ae_path}})
    with pytest.raises(ConfigError, match="not a multiple|factor"):
        resolve({"kind": "diffusion", "data": {"name": "shapes", "size": 18, "latent": ae_path}})
    with pytest.raises(ConfigError, match="latent diffusion\\) is for kind 'diffusion', not 'classifier'"):
        resolve({"kind": "classifier", "data": {"name": "digits", "latent": ae_path}})
