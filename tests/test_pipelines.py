"""Tests for stepdiff.pipelines: latent diffusion (a UNet on scaled latents, conditioned through
cross-attention on a frozen CLIP text tower) and the text-to-image pipeline end to end at tiny
size: prompt in, images of the right shape and range out, the same images for the same seed,
guidance scale 1 equal to the conditional model and 0 to the unconditional one, every sampler,
pixel space, and clear errors for empty prompts, unknown words and negative guidance."""

from __future__ import annotations

import math

import pytest
import torch

from stepdiff.models.autoencoder import Autoencoder, AutoencoderConfig
from stepdiff.models.clip import CLIP, CLIPConfig
from stepdiff.models.unet import UNetConfig
from stepdiff.pipelines import TextToImage, encode_dataset, latent_text_model
from stepdiff.samplers import SAMPLERS, sample_euler
from stepdiff.schedules import FlowMatchingSchedule, VPCosineSchedule, time_grid
from stepdiff.shapes import make_shapes
from stepdiff.text import Tokenizer
from stepdiff.train import train

TOK = Tokenizer()
PROMPTS = ["a red circle", "a large blue square at the top left and a small white star on the right"]


pytestmark = pytest.mark.usefixtures("one_thread")


def unet_config(in_channels: int = 4) -> UNetConfig:
    return UNetConfig(in_channels=in_channels, channels=8, channel_mult=(1, 2), attn_levels=(1,), heads=2,
                      norm_groups=4)


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give the zero-initialised layers (output convolutions, attention outputs) random weights, so
    that the untrained model's output depends on its input and its caption."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def parts(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip = CLIP(CLIPConfig.preset("tiny"))
        ae = Autoencoder(AutoencoderConfig.preset("tiny"))  # 16x16 -> 4x4x4
        model = latent_text_model(clip, unet_config())
    perturb(model.denoiser, seed)
    return clip, ae, model


def pipeline(seed: int = 0, **kw) -> TextToImage:
    _, ae, model = parts(seed)
    return TextToImage(model, ae, image_size=16, **kw)


def test_end_to_end_shape_range_and_determinism():
    pipe = pipeline()
    images = pipe(PROMPTS, num_images_per_prompt=2, steps=4, seed=3)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    again = pipe(PROMPTS, num_images_per_prompt=2, steps=4, seed=3)
    assert torch.equal(images, again)
    other = pipe(PROMPTS, num_images_per_prompt=2, steps=4, seed=4)
    assert not torch.allclose(images, other)
    # Two images of one prompt come from different noise.
    assert not torch.allclose(images[0], images[1])
    # A prompt alone gives the images it gets in a batch (one row of noise each, in order).
    images2, latents = pipe(PROMPTS[0], num_images_per_prompt=2, steps=4, seed=3, return_latents=True)
    assert latents.shape == (2, 4, 4, 4)
    assert torch.allclose(images2, images[:2], atol=1e-5)
    assert "latents (4, 4, 4)" in repr(pipe)


def test_guidance_scale_one_is_the_conditional_model_and_zero_the_unconditional():
    _, ae, model = parts(1)
    pipe = TextToImage(model, ae, image_size=16)
    ids = TOK.encode(PROMPTS)
    schedule, ts = FlowMatchingSchedule(), time_grid(5, "uniform")

    def by_hand(y: torch.Tensor | None) -> torch.Tensor:
        g = torch.Generator().manual_seed(11)
        x = torch.randn(2, 4, 4, 4, generator=g)
        with torch.no_grad():
            z = sample_euler(lambda x, t: model(x, t, y=y), x, schedule, ts, prediction="velocity")
            return ae.decode_latents(z)

    cond = pipe(PROMPTS, guidance_scale=1.0, steps=5, seed=11)
    uncond = pipe(PROMPTS, guidance_scale=0.0, steps=5, seed=11)
    assert torch.equal(cond, by_hand(ids))
    assert torch.equal(uncond, by_hand(None))
    assert not torch.allclose(cond, uncond)
    # Guidance beyond 1 extrapolates away from the unconditional images.
    strong = pipe(PROMPTS, guidance_scale=4.0, steps=5, seed=11)
    assert not torch.allclose(strong, cond)


def test_the_start_is_scaled_by_sigma_of_the_first_time():
    """On a variance-exploding process the sampler starts from sigma(t_0) z, not z."""
    from stepdiff.schedules import VESchedule

    _, ae, model = parts(6)
    schedule = VESchedule(sigma_q=5.0)
    pipe = TextToImage(model, ae, image_size=16, schedule=schedule, prediction="x0")
    ids = TOK.encode(PROMPTS[:1])
    images, latents = pipe(PROMPTS[:1], guidance_scale=1.0, steps=4, t_max=0.8, seed=2, return_latents=True)
    ts = time_grid(4, "uniform", schedule, t_max=0.8)
    x = 5.0 * math.sqrt(0.8) * torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = sample_euler(lambda x, t: model(x, t, y=ids), x, schedule, ts, prediction="x0")
    assert torch.allclose(latents, want, atol=1e-5)


def test_the_text_encoder_is_the_frozen_clip_text_tower():
    clip, _, model = parts(2)
    assert model.encoder is clip.text_encoder
    assert model.denoiser.config.context_dim == clip.config.text_dim
    assert not any(p.requires_grad for p in clip.text_encoder.parameters())
    assert all(p.requires_grad for p in model.denoiser.parameters())
    assert torch.equal(model.null_ids, TOK.empty(1)[0])
    # Training moves the UNet only.
    latents = torch.randn(8, 4, 4, 4)
    labels = TOK.encode(make_shapes(8, seed=0, size=16, masks=False).captions, max_len=TOK.max_len)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, latents, FlowMatchingSchedule(), prediction="velocity", labels=labels,
                   label_dropout=0.2, steps=3, batch_size=4, seed=0)
    after = result.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("denoiser."))


def test_latent_diffusion_trains_on_scaled_latents():
    """The whole training path at tiny size: fit the scale, encode a dataset, and train the latent
    UNet on its captions (with caption dropout); the flow-matching loss falls."""
    clip, ae, _ = parts(3)
    data = make_shapes(64, seed=0, size=16, n_objects=1, masks=False)
    ae.fit_scale_factor(data.images)
    latents = encode_dataset(ae, data.images, batch_size=24)
    assert latents.shape == (64, 4, 4, 4)
    assert abs(float(latents.double().std()) - 1.0) < 1e-4
    with torch.no_grad():
        assert torch.allclose(latents[:24], ae.encode_latents(data.images[:24]), atol=1e-6)
    torch.manual_seed(0)
    model = latent_text_model(clip, unet_config())
    labels = TOK.encode(data.captions)
    result = train(model, latents, FlowMatchingSchedule(), prediction="velocity", labels=labels,
                   label_dropout=0.1, steps=60, batch_size=32, lr=3e-3, seed=0)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.9 * first, (first, last)
    pipe = TextToImage(result.model, ae, image_size=16)
    assert pipe("a small green triangle at the top", steps=3).shape == (1, 3, 16, 16)


@pytest.mark.parametrize("name", sorted(n for n in SAMPLERS if "tutorial" not in n))
def test_every_sampler_runs_the_pipeline(name):
    pipe = pipeline(4, schedule=VPCosineSchedule(), prediction="v")
    images = pipe(PROMPTS[:1], steps=6, sampler=name, seed=5, guidance_scale=2.0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert torch.equal(images, pipe(PROMPTS[:1], steps=6, sampler=name, seed=5, guidance_scale=2.0))


def test_pixel_space_pipeline():
    clip = CLIP(CLIPConfig.preset("tiny"))
    model = perturb(latent_text_model(clip, unet_config(in_channels=3)), 5)
    pipe = TextToImage(model, None, image_size=8)
    images = pipe(PROMPTS, steps=3)
    assert images.shape == (2, 3, 8, 8) and images.abs().max() <= 1
    assert "pixels" in repr(pipe)


def test_prompt_errors_name_the_prompt():
    pipe = pipeline()
    with pytest.raises(ValueError, match=r"prompt 0 '' is empty"):
        pipe("", steps=2)
    with pytest.raises(ValueError, match=r"prompt 1 ' , ! ' is empty"):
        pipe(["a red circle", " , ! "], steps=2)
    with pytest.raises(ValueError, match=r"prompt 1 'a red circel' has unknown word\(s\) \['circel'\]"):
        pipe(["a blue star", "a red circel"], steps=2)
    with pytest.raises(ValueError, match=r"known words are: a, an, small"):
        pipe("a purple unicorn", steps=2)
    # Kept as <unk> when asked, but a prompt of unknown words only is still refused.
    assert pipe("a red circel", steps=2, unknown="keep").shape == (1, 3, 16, 16)
    assert (pipe.encode_prompts("a red circel", unknown="keep") == TOK.unk_id).sum() == 1
    with pytest.raises(ValueError, match=r"prompt 0 'foo bar' has unknown word"):
        pipe("foo bar", steps=2, unknown="keep")
    with pytest.raises(ValueError, match="prompts must be"):
        pipe([], steps=2)
    with pytest.raises(ValueError, match="prompt 0 must be a string"):
        pipe([3], steps=2)
    # Longer than the text encoder's positions (27 tokens with <bos> and <eos>).
    too_long = " and ".join(["a red circle at the top left"] * 4)
    with pytest.raises(ValueError, match=r"prompt 1 'a red circle at the top left and .*' needs 33 tokens, more than "
                                         r"the text encoder's 27"):
        pipe(["a red circle", too_long], steps=2)


def test_argument_errors():
    pipe = pipeline()
    for w in (-0.5, -1, float("nan")):
        with pytest.raises(ValueError, match="guidance_scale must be a number >= 0"):
            pipe("a red circle", guidance_scale=w)
    with pytest.raises(ValueError, match="unknown sampler 'euler2'"):
        pipe("a red circle", sampler="euler2")
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        pipe("a red circle", num_images_per_prompt=0)
    with pytest.raises(ValueError, match="steps"):
        pipe("a red circle", steps=0)
    with pytest.raises(ValueError, match="unknown must be"):
        pipe("a red circle", unknown="drop")
    _, ae, model = parts()
    with pytest.raises(ValueError, match="not divisible by the autoencoder's downsampling factor 4"):
        TextToImage(model, ae, image_size=18)
    with pytest.raises(ValueError, match="denoiser takes 3 channels"):
        TextToImage(latent_text_model(CLIP(CLIPConfig.preset("tiny")), unet_config(3)), ae, image_size=16)
    with pytest.raises(TypeError, match="null_ids"):
        TextToImage(model.denoiser, ae)
    with pytest.raises(ValueError, match="does not read this tokenizer"):
        from stepdiff.models.text import TextEncoder

        latent_text_model(TextEncoder(99, 16, 1, 2), unet_config())
    assert math.isfinite(float(pipe("a red circle", steps=1).sum()))


# --- the parts as runs of `stepdiff train` ------------------------------------------------------

PART_RUNS = {
    "clip": ["kind=clip", "data.name=shapes", "data.size=16", "data.condition=text", "data.n=64",
             "data.n_held_out=100", "model.preset=tiny"],
    "vae": ["kind=vae", "data.name=digits", "data.size=8", "model.hidden=[16]", "model.latent_dim=3"],
    "autoencoder": ["kind=autoencoder", "data.name=shapes", "data.size=16", "data.n=64", "data.n_held_out=32",
                    "model.preset=tiny"],
}


@pytest.mark.parametrize("kind", sorted(PART_RUNS))
def test_parts_train_with_stepdiff_train_and_record_held_out_scores(kind, tmp_path):
    from stepdiff import checkpoints as ckpt
    from stepdiff.runs import export_run, train_run

    overrides = [*PART_RUNS[kind], "train.steps=6", "train.batch_size=16", "train.threads=1", "train.lr=3e-3"]
    threads = torch.get_num_threads()
    try:
        run = train_run(None, tmp_path / "run.pt", overrides=overrides)
    finally:
        torch.set_num_threads(threads)
    assert len(run.losses) == 6 and all(math.isfinite(v) for v in run.losses)
    scores = run.record["held_out"]
    model, record = ckpt.load(run.path)
    assert record["kind"] == kind and record["held_out"] == scores
    if kind == "clip":
        assert scores["n_way"] == 100 and 0 <= scores["text_to_image_top1"] <= 1 and scores["n"] == 100
    elif kind == "vae":
        assert scores["iwae64_bits_per_dim"] <= scores["bits_per_dim"] + 0.05 and scores["kl_nats"] >= 0
    else:
        # The scale was fitted on the final (EMA) weights and stored in both weight sets.
        assert float(model.scale_factor) == pytest.approx(scores["scale_factor"])
        assert torch.load(run.path, weights_only=True)["model"]["scale_factor"] == pytest.approx(scores["scale_factor"])
        assert math.isfinite(scores["psnr"]) and scores["latent_std"] == pytest.approx(1.0, rel=0.3)
    # Exported in float16 with its record; the export loads into the same kind of model.
    weights, rec_path = export_run(run.path, tmp_path / "w", f"tiny-{kind}")
    exported, exported_record = ckpt.load(weights)
    assert exported_record["held_out"] == scores and type(exported) is type(model)


def test_part_configuration_errors():
    from stepdiff.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="condition must be 'text' for kind 'clip'"):
        resolve({"kind": "clip", "data": {"name": "shapes"}})
    with pytest.raises(ConfigError, match="condition must be 'none' for kind 'vae'"):
        resolve({"kind": "vae", "data": {"name": "shapes", "condition": "text"}})
    with pytest.raises(ConfigError, match="17 levels"):
        resolve({"kind": "vae", "data": {"name": "digits", "size": 16}})
    with pytest.raises(ConfigError, match=r"unknown autoencoder preset 'f8'"):
        resolve({"kind": "autoencoder", "data": {"name": "shapes"}, "model": {"preset": "f8"}})
    with pytest.raises(ConfigError, match=r"unknown clip model field\(s\) \['depth'\]"):
        resolve({"kind": "clip", "data": {"name": "shapes", "condition": "text"}, "model": {"depth": 3}})
    with pytest.raises(ConfigError, match="image_size is set from the data"):
        resolve({"kind": "clip", "data": {"name": "shapes", "condition": "text"}, "model": {"image_size": 16}})
    with pytest.raises(ConfigError, match="digits or the shapes"):
        resolve({"kind": "autoencoder", "data": {"name": "cifar10", "path": "x"}})
    with pytest.raises(ConfigError, match="unknown key 'label_dropout'"):
        resolve({"kind": "vae", "data": {"name": "digits"}, "train": {"label_dropout": 0.1}})
