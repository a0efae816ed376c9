r"""A small CLIP (Radford et al. 2021): an image tower and a text tower trained to agree.

Two encoders map an image $x_i$ and a caption $c_j$ to unit vectors in one space of dimension
$E$:

- **ImageTower**: a small CNN. Stages of (3x3 convolution, GroupNorm, SiLU) twice, then 2x2
  average pooling, down to an $s\times s$ map (4x4 for 32x32 images); the map is *flattened*,
  not averaged, and projected to $E$, so where an object sits survives (captions name positions).
- **TextTower**: the caption's token ids through a {class}`~stepdiff.models.text.TextEncoder`
  (a small transformer whose attention ignores padding), pooled at the end token (the last real
  token of each row: ``<eos>`` for {class}`~stepdiff.text.Tokenizer` rows) or by the mean over
  the real tokens, then projected to $E$. Its per-token outputs, before pooling, are what a
  text-to-image denoiser attends to.

With $u_i = f(x_i)/\lVert f(x_i)\rVert$, $v_j = g(c_j)/\lVert g(c_j)\rVert$ and a learned
temperature $\tau = e^{-s}$ (the scale $e^s$ starts at $1/0.07$ and is capped at 100, as in CLIP),
the logits of a batch of $B$ pairs are $\ell_{ij} = e^{s}\,u_i^\top v_j$, and the **symmetric
contrastive loss** is the mean of two cross-entropies, images against texts and texts against
images, whose right answers are the diagonal:

$$\mathcal L = \frac12\Big[\frac1B\sum_i -\log\frac{e^{\ell_{ii}}}{\sum_j e^{\ell_{ij}}}
+ \frac1B\sum_j -\log\frac{e^{\ell_{jj}}}{\sum_i e^{\ell_{ij}}}\Big].$$

{func}`retrieval_accuracy` measures the result ($n$-way top-1, both directions) and
{func}`clip_score` reads the agreement of any image with any caption (CLIPScore, Hessel et al.
2021, in the $100\max(\cos, 0)$ form of common implementations).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .text import TextEncoder

__all__ = [
    "CLIPConfig",
    "ImageTower",
    "TextTower",
    "CLIP",
    "contrastive_loss",
    "clip_loss",
    "retrieval_accuracy",
    "clip_score",
    "CLIP_PRESETS",
]


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


@dataclass
class CLIPConfig:
    """Sizes of a {class}`CLIP` (the defaults are the ``small`` preset, for 32x32 "shapes").

    ``vocab_size``, ``max_len`` and ``pad_id`` default to those of {class}`stepdiff.text.Tokenizer`.
    """

    image_size: int = 32  # H = W of the images
    in_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128)  # one CNN stage each, each halving the resolution
    norm_groups: int = 8  # GroupNorm groups; must divide every width
    embed_dim: int = 128  # E, the shared embedding space
    text_dim: int = 64  # width of the text transformer (the context width a denoiser attends to)
    text_depth: int = 2
    text_heads: int = 4
    pool: str = "eos"  # "eos": the last real token; "mean": the mean over the real tokens
    vocab_size: int | None = None
    max_len: int | None = None
    pad_id: int | None = None
    init_temperature: float = 0.07  # tau at initialisation (logit scale 1/tau)
    max_logit_scale: float = 100.0  # the cap on e^s
    attn_backend: str | None = None

    def __post_init__(self) -> None:
        if self.vocab_size is None or self.max_len is None or self.pad_id is None:
            from ..text import Tokenizer

            tok = Tokenizer()
            self.vocab_size = tok.vocab_size if self.vocab_size is None else self.vocab_size
            self.max_len = tok.max_len if self.max_len is None else self.max_len
            self.pad_id = tok.pad_id if self.pad_id is None else self.pad_id
        self.widths = tuple(self.widths)
        for name in ("image_size", "in_channels", "norm_groups", "embed_dim", "text_dim", "text_depth",
                     "text_heads", "vocab_size", "max_len"):
            _positive_int(name, getattr(self, name))
        if not self.widths:
            raise ValueError("widths must name at least one CNN stage")
        for w in self.widths:
            _positive_int("widths entries", w)
            if w % self.norm_groups:
                raise ValueError(f"norm_groups {self.norm_groups} does not divide the width {w}")
        k = 2 ** len(self.widths)
        if self.image_size % k:
            raise ValueError(f"image_size {self.image_size} must be divisible by {k} (2^len(widths), "
                             f"{len(self.widths)} pooling stages)")
        if self.pool not in ("eos", "mean"):
            raise ValueError(f"pool must be 'eos' or 'mean'; got {self.pool!r}")
        if not (self.max_logit_scale > 1.0 and self.init_temperature > 0
                and 1.0 / self.init_temperature <= self.max_logit_scale):
            raise ValueError(f"init_temperature must be >= 1/max_logit_scale (> 0), and max_logit_scale > 1; got "
                             f"{self.init_temperature} and {self.max_logit_scale}")

    @classmethod
    def preset(cls, name: str, **changes) -> CLIPConfig:
        """A named configuration ({data}`CLIP_PRESETS`) with fields replaced by ``changes``."""
        if name not in CLIP_PRESETS:
            raise ValueError(f"unknown CLIP preset {name!r}; choose one of {sorted(CLIP_PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown CLIPConfig fields {unknown}; the fields are {sorted(known)}")
        return replace(CLIP_PRESETS[name], **changes)


CLIP_PRESETS: dict[str, CLIPConfig] = {
    # About 0.5 M parameters: three CNN stages 32 -> 4 and a 2-block text transformer of width 64.
    "small": CLIPConfig(),
    # For tests, at 16x16: two stages and a 1-block text transformer of width 16.
    "tiny": CLIPConfig(image_size=16, widths=(8, 16), norm_groups=4, embed_dim=16, text_dim=16, text_depth=1,
                       text_heads=2),
}


class ImageTower(nn.Module):
    r"""Images ``[B, C, H, W]`` to features ``[B, E]`` (not normalised):
    $f(x) = W\,\mathrm{flatten}(\mathrm{CNN}(x)) + b$, the CNN's stages each ending in a 2x2 average pool."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        c = config
        layers: list[nn.Module] = []
        width = c.in_channels
        for w in c.widths:
            for c_in in (width, w):
                layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.GroupNorm(c.norm_groups, w), nn.SiLU()]
            layers.append(nn.AvgPool2d(2))
            width = w
        self.body = nn.Sequential(*layers)
        side = c.image_size // 2 ** len(c.widths)
        self.proj = nn.Linear(width * side * side, c.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.body(x).flatten(1))


class TextTower(nn.Module):
    r"""Token ids ``[B, L]`` to features ``[B, E]`` (not normalised): $g(c) = W h_n$ (``pool="eos"``, the
    last real token $n$) or $g(c) = W\frac1n\sum_{i\le n} h_i$ (``pool="mean"``), with $h_i$ the text
    transformer's output at token $i$. {meth}`~stepdiff.models.clip.TextTower.tokens` gives the per-token context
    ``[B, L, text_dim]`` and its mask."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        c = config
        self.pool = c.pool
        self.encoder = TextEncoder(c.vocab_size, c.text_dim, c.text_depth, c.text_heads, c.max_len,
                                   pad_id=c.pad_id, attn_backend=c.attn_backend)
        self.proj = nn.Linear(c.text_dim, c.embed_dim, bias=False)

    def tokens(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """The transformer's outputs for every token ``[B, L, text_dim]`` and the mask ``[B, L]``."""
        return self.encoder(ids)

    def forward(self, ids: Tensor) -> Tensor:
        h, mask = self.encoder(ids)
        if self.pool == "eos":
            last = mask.sum(1) - 1  # rows are real tokens then padding: the last real one
            pooled = h[torch.arange(h.shape[0], device=h.device), last]
        else:
            m = mask.to(h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1)
        return self.proj(pooled)


class CLIP(nn.Module):
    r"""The two towers and the learned temperature; see the module docstring.

    - {meth}`encode_image` ``[B, C, H, W] -> [B, E]`` and {meth}`encode_text` ``[B, L] -> [B, E]``:
      unit vectors.
    - ``forward(images, ids)``: the logits ``[B, B]``, $\ell_{ij} = e^s u_i^\top v_j$ (row $i$ an
      image, column $j$ a caption).
    - {meth}`loss`: {func}`contrastive_loss` of those logits.
    - ``text_encoder``: the text tower's transformer (a {class}`~stepdiff.models.text.TextEncoder`),
      ready to be the frozen encoder of a {class}`~stepdiff.models.text.TextConditioned` denoiser.
    """

    def __init__(self, config: CLIPConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = CLIPConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = config
        self.image = ImageTower(config)
        self.text = TextTower(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    @property
    def text_encoder(self) -> TextEncoder:
        return self.text.encoder

    @property
    def scale(self) -> Tensor:
        r"""$e^s$, capped at ``max_logit_scale``."""
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def _check_images(self, x: Tensor) -> None:
        c = self.config
        want = (c.in_channels, c.image_size, c.image_size)
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point() or tuple(x.shape[1:]) != want:
            desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"images must be a float batch [B, {', '.join(map(str, want))}]; got {desc}")

    def encode_image(self, images: Tensor) -> Tensor:
        """Unit image embeddings ``[B, E]``."""
        self._check_images(images)
        return F.normalize(self.image(images).float(), dim=-1)

    def encode_text(self, ids: Tensor) -> Tensor:
        """Unit text embeddings ``[B, E]`` of token rows ``[B, L]`` (right-padded with ``pad_id``)."""
        return F.normalize(self.text(ids).float(), dim=-1)

    def forward(self, images: Tensor, ids: Tensor) -> Tensor:
        if not isinstance(ids, Tensor) or not isinstance(images, Tensor) or ids.shape[:1] != images.shape[:1]:
            raise ValueError(f"images and ids must be batches of the same size; got {getattr(images, 'shape', None)} "
                             f"and {getattr(ids, 'shape', None)}")
        u, v = self.encode_image(images), self.encode_text(ids)
        return self.scale * u @ v.T

    def loss(self, images: Tensor, ids: Tensor) -> Tensor:
        """The symmetric contrastive loss of a batch of matching pairs."""
        return contrastive_loss(self(images, ids))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def contrastive_loss(logits: Tensor) -> Tensor:
    r"""The symmetric InfoNCE loss for logits ``[B, B]`` whose diagonal holds the matching pairs: the
    mean of the row-wise and the column-wise cross-entropies,
    $\mathcal L = \frac1{2B}\sum_i\Big[-\log\frac{e^{\ell_{ii}}}{\sum_j e^{\ell_{ij}}}
    - \log\frac{e^{\ell_{ii}}}{\sum_j e^{\ell_{ji}}}\Big]$."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != logits.shape[1] or logits.shape[0] < 1:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a square [B, B] tensor (images x captions); got {shape}")
    target = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def clip_loss(model: CLIP, images: Tensor, ids: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
    r"""{func}`contrastive_loss` of $\ell_{ij} = e^s u_i^\top v_j$ for a batch of images ``x0`` and their
    token rows ``y``, in the shape of {func}`stepdiff.train.train`'s ``loss_fn(model, x0, y, generator)``
    (the generator is not used). The model is called through its ``forward``, so a
    ``DistributedDataParallel`` wrapper works; the negatives are then the pairs of each process's
    micro-batch."""
    if ids is None:
        raise ValueError("the CLIP loss needs captions: pass the token rows as labels")
    return contrastive_loss(model(images, ids))


def retrieval_accuracy(
    image_features: Tensor,
    text_features: Tensor,
    *,
    n_way: int | None = None,
    same: Sequence | Tensor | None = None,
) -> dict:
    r"""Top-1 retrieval accuracy in both directions among $n$ candidates.

    ``image_features``, ``text_features``: ``[N, E]``, row $i$ of each a matching pair (normalised
    or not: the score is the cosine). ``n_way``: the pairs are cut into consecutive groups of
    ``n_way`` (which must divide $N$; default: one group of $N$) and each query competes with the
    others of its group; chance is $1/n$.

    - ``text_to_image``: the fraction of captions whose most similar image in the group is their own;
    - ``image_to_text``: the fraction of images whose most similar caption in the group is their own.

    ``same``: optional keys ``[N]`` (e.g. the caption strings); a retrieved item counts as right
    when its key equals the query's, so two images with the same caption are not counted as a miss.
    Returns ``{"text_to_image", "image_to_text", "n_way", "groups", "chance"}``.
    """
    for name, f in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(f, Tensor) or f.ndim != 2 or not f.is_floating_point():
            desc = f"{f.dtype} {tuple(f.shape)}" if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"{name} must be a float tensor [N, E]; got {desc}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must have the same shape (one row per pair)")
    N = image_features.shape[0]
    n = N if n_way is None else n_way
    if isinstance(n, bool) or not isinstance(n, int) or n < 2 or N % n:
        raise ValueError(f"n_way must be an integer >= 2 that divides the number of pairs {N}; got {n_way!r}")
    if same is None:
        keys = torch.arange(N)
    else:
        if len(same) != N:
            raise ValueError(f"same must have one key per pair ({N}); got {len(same)}")
        if isinstance(same, Tensor):
            keys = same.reshape(N).cpu()
        else:
            index: dict = {}
            keys = torch.tensor([index.setdefault(k, len(index)) for k in same])
    u = F.normalize(image_features.double(), dim=-1).reshape(N // n, n, -1)
    v = F.normalize(text_features.double(), dim=-1).reshape(N // n, n, -1)
    sim = (u @ v.transpose(1, 2)).cpu()  # [G, n images, n texts]
    keys = keys.reshape(N // n, n)
    i2t = keys.gather(1, sim.argmax(2)) == keys  # image i's best text has i's key
    t2i = keys.gather(1, sim.argmax(1)) == keys  # text j's best image has j's key
    return {
        "text_to_image": float(t2i.double().mean()),
        "image_to_text": float(i2t.double().mean()),
        "n_way": n,
        "groups": N // n,
        "chance": 1.0 / n,
    }


@torch.no_grad()
def clip_score(model: CLIP, images: Tensor, ids: Tensor, *, batch_size: int = 500) -> Tensor:
    r"""CLIPScore of each image with its caption: $100\max(\cos(u_i, v_i), 0)$, a tensor ``[N]``.

    ``images`` ``[N, C, H, W]`` in $[-1, 1]$, ``ids`` ``[N, L]`` token rows. The model is run in
    evaluation mode, ``batch_size`` pairs at a time.
    """
    if not isinstance(images, Tensor) or not isinstance(ids, Tensor) or images.shape[0] != ids.shape[0]:
        raise ValueError(f"images and ids must hold the same number of pairs; got {getattr(images, 'shape', None)} "
                         f"and {getattr(ids, 'shape', None)}")
    was_training = model.training
    model.eval()
    device = model.logit_scale.device
    try:
        out = []
        for i in range(0, images.shape[0], batch_size):
            u = model.encode_image(images[i : i + batch_size].to(device))
            v = model.encode_text(ids[i : i + batch_size].to(device))
            out.append((u * v).sum(-1).clamp(min=0.0) * 100.0)
    finally:
        model.train(was_training)
    return torch.cat(out).cpu()
