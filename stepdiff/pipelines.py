r"""Latent diffusion and the text-to-image pipeline: the three trained parts put together.

A text-to-image system in the manner of Stable Diffusion (Rombach et al. 2022) is three networks:

1. a **text encoder**: here the text tower of the small {class}`~stepdiff.models.clip.CLIP`,
   frozen, whose per-token outputs (before pooling) are the context ``[B, L, D]`` the denoiser
   attends to;
2. an **autoencoder** ({class}`~stepdiff.models.autoencoder.Autoencoder`), frozen, in whose
   latent space the diffusion runs: training images become scaled latents $z = s\cdot\mu(x)$
   ({func}`encode_dataset`), and sampled latents are decoded back to images;
3. a **denoiser**: the package's {class}`~stepdiff.models.unet.UNet` on latents, with
   cross-attention to the text context ({func}`latent_text_model` joins it to the frozen text
   encoder in a {class}`~stepdiff.models.text.TextConditioned`, so that it is called as
   ``model(x, t, y=token_ids)`` and trained by {func}`stepdiff.train.train` with captions as
   labels and caption dropout for guidance).

{class}`TextToImage` runs the whole chain:

$$\text{prompt} \xrightarrow{\text{tokenizer}} \text{ids} \xrightarrow{\text{text encoder}} c
\xrightarrow{\text{guided sampler}} z_0 \xrightarrow{\text{decoder}} x,$$

with classifier-free guidance on text, $\hat p = p(z_t, \varnothing) + w\,(p(z_t, c) - p(z_t,
\varnothing))$, through {class}`~stepdiff.guidance.ClassifierFreeGuidance`, and any sampler of
{mod}`stepdiff.samplers`. Without an autoencoder the same pipeline samples in pixel space (the
pixel-space model that latent diffusion is compared with).

The three trained parts are also kinds of run of ``stepdiff train`` ({data}`PART_KINDS`): the
configuration's ``[model]`` table names a preset and changes to its config dataclass
({func}`part_config`), the loop is {func}`stepdiff.train.train` with the part's own loss
({func}`part_loss`), and when a run ends {func}`finish_part` fits what is measured once (the
autoencoder's latent scale) and scores the part on held-out data for its record.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from .guidance import ClassifierFreeGuidance
from .models.autoencoder import Autoencoder
from .models.clip import CLIP
from .models.text import TextConditioned, TextEncoder
from .models.unet import UNet, UNetConfig
from .samplers import SAMPLERS
from .schedules import FlowMatchingSchedule, Schedule, time_grid
from .text import Tokenizer

__all__ = [
    "freeze",
    "latent_text_model",
    "encode_dataset",
    "TextToImage",
    "PART_KINDS",
    "part_config",
    "build_part",
    "part_loss",
    "finish_part",
]


def freeze(module: nn.Module) -> nn.Module:
    r"""Hold ``module``'s parameters $\theta$ fixed (no gradient $\partial\mathcal L/\partial\theta$ is
    computed, so no optimiser moves them) and put it in evaluation mode; returns it."""
    module.requires_grad_(False)
    return module.eval()


def latent_text_model(text_encoder: TextEncoder | CLIP, config: UNetConfig, *,
                      tokenizer: Tokenizer | None = None, freeze_encoder: bool = True,
                      word_rows: bool = False, word_row_objects: int = 1, layout: bool = False) -> TextConditioned:
    r"""A text-conditioned {class}`~stepdiff.models.unet.UNet` whose context is the (frozen) text encoder's
    per-token output: ``model(z, t, y=token_ids)`` $= f_\theta\big(z_t, t, E(c)\big)$ with the encoder
    $E$ fixed.

    ``text_encoder``: a {class}`~stepdiff.models.text.TextEncoder`, or a {class}`~stepdiff.models.clip.CLIP`
    whose text tower's encoder is taken. ``config``: the UNet's sizes; its ``context_dim`` is set
    to the encoder's width (``in_channels`` is the autoencoder's ``latent_channels`` for latent
    diffusion, the image channels in pixel space). The empty caption (the "no caption" row of
    guidance and of caption dropout) is the tokenizer's ``empty`` row ``<bos> <eos>``. With
    ``freeze_encoder`` the encoder's parameters get no gradient (Stable Diffusion keeps its CLIP
    text encoder fixed), so {func}`stepdiff.train.train` updates the UNet alone; without it the
    encoder trains on with the UNet from the weights it has (fine-tuning), even if it came frozen.
    ``word_rows``: also a trained {class}`~stepdiff.models.text.WordRows` bag of words in the time
    embedding, beside the frozen encoder's tokens; with ``word_row_objects`` $= K > 1$, a table of
    rows for each of the caption's first $K$ objects, each object opened by its article ("a"/"an").
    ``layout``: also a trained {class}`~stepdiff.models.layout.LayoutRows` map of the caption's located
    objects, added to the UNet's first feature map (layout grounding).
    """
    encoder = text_encoder.text_encoder if isinstance(text_encoder, CLIP) else text_encoder
    if not isinstance(encoder, TextEncoder):
        raise TypeError(f"text_encoder must be a TextEncoder or a CLIP; got {type(text_encoder).__name__}")
    if not isinstance(config, UNetConfig):
        raise TypeError(f"config must be a UNetConfig; got {type(config).__name__}")
    tokenizer = Tokenizer() if tokenizer is None else tokenizer
    if encoder.pad_id != tokenizer.pad_id or encoder.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the text encoder (vocab_size {encoder.vocab_size}, pad_id {encoder.pad_id}) does not "
                         f"read this tokenizer's ids (vocab_size {tokenizer.vocab_size}, pad_id {tokenizer.pad_id})")
    unet = UNet(replace(config, context_dim=encoder.dim))
    if freeze_encoder:
        freeze(encoder)
    else:
        encoder.requires_grad_(True)
    return TextConditioned(unet, encoder, tokenizer.pad_id, tokenizer.empty(1)[0], word_rows=word_rows,
                           word_row_objects=word_row_objects, object_start_ids=tokenizer.article_ids,
                           layout=layout, tokens=tokenizer.tokens)


@torch.no_grad()
def encode_dataset(autoencoder: Autoencoder, images: Tensor, *, batch_size: int = 256) -> Tensor:
    r"""The scaled latents $z = s\,\mu_\phi(x)$ ($s$ = ``scale_factor``, $\mu_\phi$ the posterior mean) of
    ``images`` ``[N, C, H, W]``, in batches, in evaluation mode, on the CPU: the training data of a
    latent diffusion model."""
    if not isinstance(autoencoder, Autoencoder):
        raise TypeError(f"autoencoder must be an Autoencoder; got {type(autoencoder).__name__}")
    was = autoencoder.training
    autoencoder.eval()
    device = autoencoder.scale_factor.device
    try:
        out = [autoencoder.encode_latents(images[i : i + batch_size].to(device)).float().cpu()
               for i in range(0, images.shape[0], batch_size)]
    finally:
        autoencoder.train(was)
    return torch.cat(out)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return value


class TextToImage:
    r"""Prompt in, image out: tokenizer, text encoder, guided sampling (in latents), decoder.

    - ``model``: a text-conditioned denoiser called ``model(x, t, y=token_ids)`` with ``null_ids``
      and ``pad_id`` (a {class}`~stepdiff.models.text.TextConditioned`, e.g. from
      {func}`latent_text_model`).
    - ``autoencoder``: the {class}`~stepdiff.models.autoencoder.Autoencoder` whose scaled latents
      the model was trained on (``None``: the model works in pixels).
    - ``image_size``: the side of the output images (a multiple of the autoencoder's factor).
    - ``schedule``, ``prediction``: the diffusion process and what the model predicts, as in
      training (default: flow matching and the velocity).
    - ``tokenizer``: default {class}`~stepdiff.text.Tokenizer`.

    ``pipe(prompts, ...)`` returns images ``[B, C, H, W]`` in $[-1, 1]$; see its ``__call__``.
    """

    def __init__(self, model: nn.Module, autoencoder: Autoencoder | None = None, *, image_size: int = 32,
                 schedule: Schedule | None = None, prediction: str = "velocity",
                 tokenizer: Tokenizer | None = None) -> None:
        if not callable(model) or getattr(model, "null_ids", None) is None:
            raise TypeError("model must be a text-conditioned denoiser model(x, t, y=token_ids) with null_ids "
                            "(a TextConditioned)")
        if autoencoder is not None and not isinstance(autoencoder, Autoencoder):
            raise TypeError(f"autoencoder must be an Autoencoder or None; got {type(autoencoder).__name__}")
        self.model, self.autoencoder = model, autoencoder
        self.tokenizer = Tokenizer() if tokenizer is None else tokenizer
        self.schedule = FlowMatchingSchedule() if schedule is None else schedule
        self.prediction = prediction
        self.image_size = _positive_int("image_size", image_size)
        channels = getattr(getattr(getattr(model, "denoiser", None), "config", None), "in_channels", None)
        if autoencoder is not None:
            self.sample_shape = autoencoder.latent_shape(image_size)
            if channels is not None and channels != self.sample_shape[0]:
                raise ValueError(f"the denoiser takes {channels} channels but the autoencoder's latents have "
                                 f"{self.sample_shape[0]}")
        else:
            self.sample_shape = (3 if channels is None else channels, image_size, image_size)

    def __repr__(self) -> str:
        space = "pixels" if self.autoencoder is None else f"latents {self.sample_shape}"
        return f"TextToImage({self.image_size}x{self.image_size}, {space}, {self.schedule!r}, {self.prediction!r})"

    def encode_prompts(self, prompts: str | Sequence[str], *, unknown: str = "error") -> Tensor:
        """Token rows ``[B, L]`` of the prompts. A prompt that is empty, has no known word, or (with
        ``unknown="error"``, the default) has any word outside the vocabulary, or needs more tokens
        than the text encoder has positions, is refused with a ``ValueError`` naming it: the
        denoiser never saw ``<unk>`` in training, so an unknown word would be dropped silently.
        ``unknown="keep"`` passes such words on as ``<unk>``."""
        if unknown not in ("error", "keep"):
            raise ValueError(f"unknown must be 'error' or 'keep'; got {unknown!r}")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not prompts:
            raise ValueError(f"prompts must be a string or a non-empty list of strings; got {prompts!r}")
        tok = self.tokenizer
        for i, text in enumerate(prompts):
            if not isinstance(text, str):
                raise ValueError(f"prompt {i} must be a string; got {type(text).__name__} {text!r}")
            words = tok.words(text)
            if not words:
                raise ValueError(f"prompt {i} {text!r} is empty: describe the image (e.g. 'a red circle at the top')")
            bad = [w for w in words if w not in tok.ids]
            if bad and (unknown == "error" or len(bad) == len(words)):
                known = ", ".join(t for t in tok.tokens if not t.startswith("<"))
                raise ValueError(f"prompt {i} {text!r} has unknown word(s) {bad}; the known words are: {known}")
        ids = tok.encode(list(prompts))
        limit = getattr(getattr(self.model, "encoder", None), "max_len", None)
        lengths = (ids != tok.pad_id).sum(1)
        if limit is not None and int(lengths.max()) > limit:
            i = int(lengths.argmax())
            raise ValueError(f"prompt {i} {prompts[i]!r} needs {int(lengths[i])} tokens, more than the text "
                             f"encoder's {limit} (max_len)")
        return ids

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 3.0,
        sampler: str = "euler",
        steps: int = 30,
        spacing: str = "uniform",
        t_max: float = 1.0,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        unknown: str = "error",
        return_latents: bool = False,
        **sampler_kwargs,
    ) -> Tensor:
        r"""Images ``[B * num_images_per_prompt, C, H, W]`` in $[-1, 1]$ for the prompts, in order
        (the images of prompt $i$ are rows $i\cdot n .. i\cdot n + n - 1$).

        - ``guidance_scale`` $w \ge 0$: 1 is the conditional model, 0 the unconditional one.
        - ``sampler``: a name of {data}`stepdiff.samplers.SAMPLERS`; ``steps``, ``spacing`` and
          ``t_max`` make the grid ({func}`stepdiff.schedules.time_grid`), which starts from
          $x_{t_0} = \sigma(t_0)\,z$, $z\sim\mathcal N(0, I)$; ``sampler_kwargs`` go to the sampler.
        - ``seed`` (or a ``generator``): the initial noise and any noise the sampler draws, so a
          seed gives the same images on the same device.
        - ``return_latents``: also return the final latents (``(images, latents)``).

        For a layout-grounded model (``model.layout``, {mod}`stepdiff.models.layout`) image $j$'s
        prompt is first given a cell for every object by {func}`stepdiff.shapes.locate_captions` from
        ``(seed, j)`` (seed 0 when only a generator is given).
        """
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be a number >= 0 (1: the conditional model, 0: the "
                             f"unconditional one); got {guidance_scale!r}")
        n = _positive_int("num_images_per_prompt", num_images_per_prompt)
        _positive_int("steps", steps)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        if getattr(self.model, "layout", None) is None:
            ids = self.encode_prompts(prompts, unknown=unknown).repeat_interleave(n, dim=0)
        else:
            # A layout-grounded model reads each object's place from the caption: check the prompts
            # as written (so an error names the user's words), then plan each image's.
            from .shapes import locate_captions

            self.encode_prompts(prompts, unknown=unknown)
            each = [p for p in ([prompts] if isinstance(prompts, str) else prompts) for _ in range(n)]
            ids = self.encode_prompts(locate_captions(each, 0 if seed is None else seed))
        device = next(self.model.parameters()).device if isinstance(self.model, nn.Module) else torch.device("cpu")
        if generator is None:
            generator = torch.Generator(device=device)
            if seed is not None:
                generator.manual_seed(seed)
        ids = ids.to(device)
        ts = time_grid(steps, spacing, self.schedule, t_max=t_max)
        sigma0 = float(self.schedule.sigma(torch.tensor(float(ts[0]), dtype=torch.float64)))
        x = sigma0 * torch.randn((ids.shape[0], *self.sample_shape), generator=generator, device=device)
        kwargs = {"prediction": self.prediction, **sampler_kwargs}
        if "generator" in inspect.signature(SAMPLERS[sampler]).parameters:
            kwargs.setdefault("generator", generator)
        guided = ClassifierFreeGuidance(self.model, float(guidance_scale), y=ids)
        training = self.model.training if isinstance(self.model, nn.Module) else False
        if isinstance(self.model, nn.Module):
            self.model.eval()
        try:
            z = SAMPLERS[sampler](guided, x, self.schedule, ts, **kwargs)
        finally:
            if isinstance(self.model, nn.Module):
                self.model.train(training)
        if self.autoencoder is None:
            images = z.clamp(-1.0, 1.0)
        else:
            was = self.autoencoder.training
            self.autoencoder.eval()
            try:
                images = self.autoencoder.decode_latents(z)
            finally:
                self.autoencoder.train(was)
        return (images, z) if return_latents else images


# --- the parts as runs of `stepdiff train` ------------------------------------------------------

PART_KINDS = ("clip", "vae", "autoencoder")
"""The kinds of run that train one part of the stack with its own loss (not a diffusion loss)."""


def part_config(kind: str, model: dict, image_shape: tuple[int, int, int], levels: int | None = None):
    r"""The config dataclass of a part from a configuration's ``[model]`` table: ``preset`` (empty: the
    default) and changes to the fields, with the image's channels and side set from the data
    (``image_shape`` $= (C, H, W)$) and, for the VAE, the number of values ``levels`` the
    data take (17 for 8x8 digits, 256 for 8-bit images). Raises ``ValueError`` or ``TypeError``
    naming a wrong preset or field."""
    from dataclasses import fields

    from .models.autoencoder import AE_PRESETS, AutoencoderConfig
    from .models.clip import CLIPConfig
    from .models.vae import VAEConfig

    if kind not in PART_KINDS:
        raise ValueError(f"unknown part kind {kind!r}; choose one of {PART_KINDS}")
    C, H, W = image_shape
    if H != W:
        raise ValueError(f"the parts take square images; got {H}x{W}")
    changes = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model.items() if k != "preset"}
    preset = model.get("preset") or ""
    cls = {"clip": CLIPConfig, "vae": VAEConfig, "autoencoder": AutoencoderConfig}[kind]
    fixed = {"clip": ("image_size", "in_channels"), "vae": ("image_size", "in_channels", "levels"),
             "autoencoder": ("in_channels",)}[kind]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"unknown {kind} model field(s) {unknown}; the fields are preset and {sorted(known)}")
    for key in fixed:
        if key in changes:
            raise ValueError(f"the {kind} model's {key} is set from the data; remove it")
    if kind == "clip":
        return CLIPConfig.preset(preset or "small", image_size=H, in_channels=C, **changes)
    if kind == "vae":
        if preset:
            raise ValueError(f"the VAE has no presets; got preset {preset!r} (give its fields instead)")
        if levels is None:
            raise ValueError("the VAE's discretised likelihood needs the data's number of levels")
        return VAEConfig(image_size=H, in_channels=C, levels=levels, **changes)
    if not preset:
        preset = "f2" if H <= 16 else "f4"
    if preset not in AE_PRESETS:
        raise ValueError(f"unknown autoencoder preset {preset!r}; choose one of {sorted(AE_PRESETS)}")
    return AutoencoderConfig.preset(preset, in_channels=C, **changes)


def build_part(kind: str, config) -> nn.Module:
    r"""The part's network for its config (from {func}`part_config`): a CLIP, a VAE or an autoencoder,
    each trained to minimise its own loss $\mathcal L$ ({func}`part_loss`)."""
    from .models.autoencoder import Autoencoder
    from .models.clip import CLIP
    from .models.vae import VAE

    return {"clip": CLIP, "vae": VAE, "autoencoder": Autoencoder}[kind](config)


def part_loss(kind: str):
    r"""The part's loss in the shape of {func}`stepdiff.train.train`'s ``loss_fn``: the symmetric
    contrastive loss (CLIP), $-\mathcal L/D$ (VAE), $\lVert x - \hat x\rVert_1/D + \beta\,\mathrm{KL}/D$
    (autoencoder)."""
    from .models.autoencoder import autoencoder_loss
    from .models.clip import clip_loss
    from .models.vae import vae_loss

    if kind not in PART_KINDS:
        raise ValueError(f"unknown part kind {kind!r}; choose one of {PART_KINDS}")
    return {"clip": clip_loss, "vae": vae_loss, "autoencoder": autoencoder_loss}[kind]


@torch.no_grad()
def finish_part(kind: str, model: nn.Module, train_images: Tensor, held_images: Tensor,
                held_captions: Sequence[str] | None = None, *, seed: int = 0, batch_size: int = 500) -> dict:
    r"""What a finished run of a part measures once, on its final (EMA) weights; returns the held-out
    scores for its record.

    - autoencoder: ``scale_factor`` $= 1/\mathrm{std}(z)$ fitted on the first 2048 training images
      (stored in the model's buffer); the held-out reconstruction PSNR (mean, in dB) and the
      standard deviation of the scaled held-out latents;
    - VAE: the held-out ELBO in bits per dimension (4 draws of $z$ per image), its two terms in
      nats, and the importance-weighted bound with 64 draws;
    - CLIP: held-out top-1 retrieval in groups of 100 (as many whole groups as there are), both
      directions, identical captions counted as right, and the mean CLIPScore of the pairs.
    """
    from .models.autoencoder import psnr
    from .models.clip import clip_score, retrieval_accuracy
    from .models.vae import bits_per_dim

    model.eval()
    g = torch.Generator().manual_seed(seed)
    if kind == "autoencoder":
        scale = model.fit_scale_factor(train_images[:2048], batch_size=batch_size)
        recon = model.reconstruct(held_images, batch_size=batch_size)
        z = encode_dataset(model, held_images, batch_size=batch_size)
        return {"psnr": float(psnr(recon, held_images).mean()), "scale_factor": scale,
                "latent_std": float(z.double().std()), "n": int(held_images.shape[0])}
    if kind == "vae":
        rec, kl, iw = [], [], []
        for i in range(0, held_images.shape[0], batch_size):
            x = held_images[i : i + batch_size]
            t = model.elbo(x, samples=4, generator=g)
            rec.append(t.reconstruction)
            kl.append(t.kl)
            iw.append(model.iwae_bound(x, 64, g))
        rec, kl, iw = torch.cat(rec), torch.cat(kl), torch.cat(iw)
        D = model.config.dims
        return {"bits_per_dim": float(bits_per_dim(rec - kl, D).mean()),
                "iwae64_bits_per_dim": float(bits_per_dim(iw, D).mean()),
                "reconstruction_nats": float(rec.mean()), "kl_nats": float(kl.mean()), "n": int(held_images.shape[0])}
    if kind == "clip":
        if held_captions is None:
            raise ValueError("scoring a CLIP needs the held-out captions")
        n = (held_images.shape[0] // 100) * 100
        if n < 100:
            raise ValueError(f"100-way retrieval needs at least 100 held-out pairs; got {held_images.shape[0]}")
        ids = Tokenizer().encode(list(held_captions[:n]))
        u = torch.cat([model.encode_image(held_images[i : i + batch_size]) for i in range(0, n, batch_size)])
        v = torch.cat([model.encode_text(ids[i : i + batch_size]) for i in range(0, n, batch_size)])
        r = retrieval_accuracy(u, v, n_way=100, same=list(held_captions[:n]))
        return {"text_to_image_top1": r["text_to_image"], "image_to_text_top1": r["image_to_text"], "n_way": 100,
                "groups": r["groups"], "clip_score": float(clip_score(model, held_images[:n], ids).mean()), "n": n}
    raise ValueError(f"unknown part kind {kind!r}; choose one of {PART_KINDS}")
