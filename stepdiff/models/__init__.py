"""Small networks for the book: an MLP for 2-D toys, and for images a UNet, a DiT, the attention
layer they share and a small text encoder."""

from .attention import Attention
from .autoencoder import AE_PRESETS, Autoencoder, AutoencoderConfig, psnr
from .clip import CLIP, CLIPConfig, clip_score, contrastive_loss, retrieval_accuracy
from .controlnet import ControlNet, ControlNetConfig
from .dit import DIT_PRESETS, DiT, DiTConfig
from .layout import LayoutRows
from .mlp import MLP, MLPConfig
from .text import TextConditioned, TextEncoder, WordRows
from .unet import UNET_PRESETS, UNet, UNetConfig
from .vae import ELBO, VAE, VAEConfig

__all__ = [
    "Attention",
    "MLP",
    "MLPConfig",
    "UNet",
    "UNetConfig",
    "UNET_PRESETS",
    "DiT",
    "DiTConfig",
    "DIT_PRESETS",
    "TextEncoder",
    "TextConditioned",
    "WordRows",
    "LayoutRows",
    "CLIP",
    "CLIPConfig",
    "contrastive_loss",
    "retrieval_accuracy",
    "clip_score",
    "VAE",
    "VAEConfig",
    "ELBO",
    "Autoencoder",
    "AutoencoderConfig",
    "AE_PRESETS",
    "psnr",
    "ControlNet",
    "ControlNetConfig",
]
