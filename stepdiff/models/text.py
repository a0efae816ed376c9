r"""A small transformer text encoder, and the wrapper that conditions a denoiser on text through it.

{class}`TextEncoder` maps token ids ``[B, L]`` (right-padded with ``pad_id``) to a context
``[B, L, d]``: token embeddings plus learned positions, a few pre-LN transformer blocks

$$h \leftarrow h + \mathrm{Attn}(\mathrm{LN}(h)),\qquad h \leftarrow h + \mathrm{MLP}(\mathrm{LN}(h)),$$

whose self-attention ignores padding keys, and a final LayerNorm. It also returns the mask
``ids != pad_id``. Real tokens never see padding, so their outputs do not depend on how much
padding follows them.

{class}`TextConditioned` joins an encoder and a denoiser with cross-attention (a
{class}`~stepdiff.models.unet.UNet` or {class}`~stepdiff.models.dit.DiT` with ``context_dim``
equal to the encoder's width) into one model called as ``model(x, t, y=token_ids)``. Token rows
then play the part class labels play elsewhere: a row made only of padding means "no caption" and
is replaced by the null caption ``null_ids`` (the tokenizer's empty prompt), so ``null_class`` is
``pad_id`` and label dropout (``torch.full_like(y, model.null_class)`` for the dropped rows) and
classifier-free guidance work on token rows as they do on labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention
from .layout import LayoutRows

__all__ = ["TextBlock", "TextEncoder", "TextConditioned"]


class TextBlock(nn.Module):
    r"""A pre-LN transformer block on token features $h$ ``[B, L, dim]``: self-attention over the real
    tokens (``mask`` true; padding keys are ignored), then an MLP,

    $$h \leftarrow h + \mathrm{Attn}(\mathrm{LN}_1(h)),\qquad
    h \leftarrow h + W_2\,\mathrm{GELU}(W_1\,\mathrm{LN}_2(h) + b_1) + b_2,$$

    with the tanh GELU and a hidden width of ``mlp_ratio`` $\cdot$ ``dim``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, backend: str | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=True, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        width = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, width), nn.GELU(approximate="tanh"), nn.Linear(width, dim))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        h = h + self.attn(self.norm1(h), context_mask=mask)
        return h + self.mlp(self.norm2(h))


class TextEncoder(nn.Module):
    r"""Token ids ``[B, L]`` to a context ``[B, L, dim]`` and its mask ``[B, L]`` (see the module docstring):
    $h^{(0)}_i = E[\mathrm{id}_i] + P[i]$ (token and learned position embeddings), $h^{(k)} =
    \mathrm{Block}_k(h^{(k-1)})$ for $k = 1, \dots, n$ with $n$ = ``depth`` ({class}`TextBlock`), and the
    context is $\mathrm{LN}(h^{(n)})$; the mask is true where $\mathrm{id}_i \ne$ ``pad_id``.

    - ``vocab_size``: ids lie in ``0..vocab_size - 1``; ``pad_id`` is the padding id.
    - ``dim``, ``depth``, ``heads``: width, number of blocks and attention heads. ``depth = 0`` is no
      transformer at all: each token's context is $\mathrm{LN}(E[\mathrm{id}_i] + P[i])$, a free,
      normalised row per word and place that no other token changes (a lookup, as a class label is).
    - ``max_len``: the most tokens a row may have (the learned position table's size).
    - ``one_hot``: no parameters at all: token $i$'s context is the one-hot vector $e_{\mathrm{id}_i}$
      (zero at padding), so ``dim`` must be ``vocab_size`` and ``depth`` 0. A linear map of it is a
      free row per word, and a map of the mean over a row's tokens is a bag of words.
    """

    def __init__(self, vocab_size: int, dim: int = 64, depth: int = 2, heads: int = 4, max_len: int = 32, *,
                 pad_id: int = 0, mlp_ratio: float = 4.0, attn_backend: str | None = None,
                 one_hot: bool = False) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("heads", heads), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be an integer >= 0 (0: no transformer blocks); got {depth!r}")
        if not isinstance(one_hot, bool):
            raise ValueError(f"one_hot must be true or false; got {one_hot!r}")
        if one_hot and (depth != 0 or dim != vocab_size):
            raise ValueError(f"one_hot needs depth 0 and dim = vocab_size ({vocab_size}); got depth {depth}, dim {dim}")
        if depth and dim % heads:
            raise ValueError(f"heads {heads} does not divide dim {dim}")
        if not (isinstance(pad_id, int) and 0 <= pad_id < vocab_size):
            raise ValueError(f"pad_id must be a token id in 0..{vocab_size - 1}; got {pad_id!r}")
        self.vocab_size, self.dim, self.max_len, self.pad_id = vocab_size, dim, max_len, pad_id
        self.one_hot = one_hot
        if one_hot:
            self.blocks = nn.ModuleList()
            return
        # This order of construction fixes which random numbers each weight draws for a seed.
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(TextBlock(dim, heads, mlp_ratio, attn_backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=0.02)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        mask = self._check(ids)
        if self.one_hot:
            return F.one_hot(ids, self.vocab_size).float() * mask[..., None], mask
        L = ids.shape[1]
        h = self.token_embed(ids) + self.pos_embed(torch.arange(L, device=ids.device))[None]
        for block in self.blocks:
            h = block(h, mask)
        return self.norm(h), mask

    def _check(self, ids: Tensor) -> Tensor:
        """Validate token rows; return their mask ``ids != pad_id``."""
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            desc = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be integer token rows [B, L]; got {desc}")
        B, L = ids.shape
        if B < 1 or not 1 <= L <= self.max_len:
            raise ValueError(f"ids must have B >= 1 rows of 1..{self.max_len} tokens (max_len); got {(B, L)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"ids must lie in 0..{self.vocab_size - 1} (vocab_size {self.vocab_size}); "
                             f"got values in [{int(ids.min())}, {int(ids.max())}]")
        mask = ids != self.pad_id
        lengths = mask.sum(1)
        prefix = torch.arange(L, device=ids.device)[None, :] < lengths[:, None]
        bad = (prefix != mask).any(1) | (lengths == 0)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"each row of ids must be real tokens then padding (pad_id {self.pad_id}) on the right, "
                             f"with at least one real token; row {row} is {ids[row].tolist()}")
        return mask


class WordRows(nn.Module):
    r"""A caption as a bag of free word vectors for the time embedding, as a class label is one:
    $b = \sum_{i:\,\mathrm{id}_i \ne \mathrm{pad}} R[\mathrm{id}_i]$ with $R \in \mathbb R^{V \times D}$
    drawn from $\mathcal N(0, 1)$, as {class}`torch.nn.Embedding` draws a class embedding.

    Each word has its own row, moved only by the captions that hold it, and each row moves the time
    embedding by a unit-size vector from the first step, as a label's row does. (A pool $W\bar c$ of
    a dense code shares every entry of $W$ among all words; chapter II.9 measures the difference.)
    The sum, not the mean, keeps a word's share independent of the caption's length. Rows are summed
    in float32. ``ids``: ``[B, L]`` token rows, right-padded with ``pad_id``; returns ``[B, dim]``.

    **Rows per object** (``objects`` $= K > 1$): a bag of all the caption's words cannot say which
    colour belongs to which shape ("a red circle left of a blue square" and "a blue circle left of a
    red square" give the same sum). With $K$ tables, the words of the caption's $k$-th object, from
    its opening token (one of ``start_ids``, the articles "a"/"an") up to the next object's, take
    their rows from table $k$: $b = \sum_i R_{k_i}[\mathrm{id}_i]$, $k_i = \min(K, \#\{j \le i:
    \mathrm{id}_j \in \text{starts}\}) - 1$, floored at 0 (``<bos>`` joins the first object). So "red"
    of the first object and "red" of the second are different vectors, and the sum keeps who has
    which attribute. $K = 1$ is the plain bag above, with the same parameters and the same draw.
    """

    def __init__(self, vocab_size: int, dim: int, pad_id: int, *, objects: int = 1,
                 start_ids: Sequence[int] = ()) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("objects", objects)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not (isinstance(pad_id, int) and not isinstance(pad_id, bool) and 0 <= pad_id < vocab_size):
            raise ValueError(f"pad_id must be a token id in 0..{vocab_size - 1}; got {pad_id!r}")
        start_ids = tuple(start_ids)
        if objects > 1 and not start_ids:
            raise ValueError(f"start_ids must name the tokens that open an object when objects = {objects} > 1")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size or i == pad_id
               for i in start_ids):
            raise ValueError(f"start_ids must be token ids in 0..{vocab_size - 1} other than pad_id; "
                             f"got {start_ids!r}")
        self.pad_id, self.objects, self.vocab_size = pad_id, objects, vocab_size
        self.register_buffer("start_ids", torch.tensor(start_ids, dtype=torch.long), persistent=False)
        self.rows = nn.Embedding(objects * vocab_size, dim)

    def forward(self, ids: Tensor) -> Tensor:
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            desc = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be token rows [B, L] of integer ids; got {desc}")
        ids = ids.long()
        real = (ids != self.pad_id)[..., None].float()
        return (self.rows(ids + self.object_index(ids) * self.vocab_size).float() * real).sum(1)

    def object_index(self, ids: Tensor) -> Tensor:
        """``[B, L]``: the object $k_i$ whose table each token takes its row from (0 for ``objects = 1``)."""
        if self.objects == 1:
            return torch.zeros_like(ids, dtype=torch.long)
        opened = torch.isin(ids.long(), self.start_ids.to(ids.device)).long().cumsum(1)
        return (opened - 1).clamp(0, self.objects - 1)


class TextConditioned(nn.Module):
    r"""``model(x, t, y=token_ids)`` $=$ ``denoiser(x, t, context=c, context_mask=m)`` with
    ``(c, m) = encoder(token_ids)``.

    - ``denoiser``: a network taking ``context`` of width ``encoder.dim`` (``config.context_dim``).
    - ``encoder``: a {class}`TextEncoder`; ``pad_id`` must be its padding id.
    - ``null_ids``: the token row of the empty caption (``[L0]`` or ``[1, L0]``, at least one real
      token), used for ``y=None`` and for every row of ``y`` that is all padding.

    - ``word_rows``: also add a {class}`WordRows` bag of the caption's words to the denoiser's time
      embedding (a {class}`~stepdiff.models.unet.UNet`: ``embedding=``). It is made last, so the
      other weights are what the seed draws without it. ``word_row_objects`` and
      ``object_start_ids`` are its ``objects`` and ``start_ids`` (a table of rows per named object).
    - ``layout``: also add a {class}`~stepdiff.models.layout.LayoutRows` map of the caption's located
      objects to the UNet's first feature map (``spatial=``); ``tokens`` is then the tokenizer's
      vocabulary in id order. Made after the word rows, so the other weights are unchanged.

    ``y``: ``[B, L]`` token rows, right-padded with ``pad_id``. Columns that are padding in every
    row are dropped before encoding (padding changes nothing, so this only saves work).
    """

    def __init__(self, denoiser: nn.Module, encoder: TextEncoder, pad_id: int, null_ids: Tensor, *,
                 word_rows: bool = False, word_row_objects: int = 1, object_start_ids: Sequence[int] = (),
                 layout: bool = False, tokens: Sequence[str] = ()) -> None:
        super().__init__()
        for name, value in (("word_rows", word_rows), ("layout", layout)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False; got {value!r}")
        if layout and not isinstance(getattr(getattr(denoiser, "config", None), "channels", None), int):
            raise ValueError(f"layout adds a map to the denoiser's first feature map, which needs a UNet; got a "
                             f"{type(denoiser).__name__}")
        if layout and len(tokens) != encoder.vocab_size:
            raise ValueError(f"layout needs tokens, the vocabulary in id order ({encoder.vocab_size} words); got "
                             f"{len(tokens)}")
        if word_row_objects != 1 and not word_rows:
            raise ValueError(f"word_row_objects = {word_row_objects!r} splits the word rows by object: it needs "
                             f"word_rows=True")
        if word_rows and not isinstance(getattr(denoiser, "embed_dim", None), int):
            raise ValueError(f"word_rows adds to the denoiser's time embedding, which needs a UNet; got a "
                             f"{type(denoiser).__name__}")
        width = getattr(getattr(denoiser, "config", None), "context_dim", None)
        if width != encoder.dim:
            raise ValueError(f"the denoiser's context_dim ({width}) must equal the encoder's dim ({encoder.dim})")
        if pad_id != encoder.pad_id:
            raise ValueError(f"pad_id {pad_id} differs from the encoder's pad_id {encoder.pad_id}")
        null_ids = torch.as_tensor(null_ids)
        if null_ids.ndim == 2 and null_ids.shape[0] == 1:
            null_ids = null_ids[0]
        if null_ids.ndim != 1 or null_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"null_ids must be one row of token ids, [L0] or [1, L0]; got {null_ids.dtype} "
                             f"{tuple(null_ids.shape)}")
        encoder._check(null_ids[None])  # in range, right-padded, at least one real token
        self.denoiser, self.encoder, self.pad_id = denoiser, encoder, pad_id
        self.register_buffer("null_ids", null_ids.long().clone())
        self.word_rows = WordRows(encoder.vocab_size, denoiser.embed_dim, pad_id, objects=word_row_objects,
                                  start_ids=object_start_ids) if word_rows else None
        self.layout = LayoutRows(tokens, denoiser.config.channels, pad_id) if layout else None

    @property
    def null_class(self) -> int:
        """The "label" of an uncaptioned row: a row made only of this id (``pad_id``) means no caption."""
        return self.pad_id

    def captions(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """The token rows to encode: ``y`` with its all-padding rows (or every row, for ``None``)
        replaced by ``null_ids``, and the all-padding columns on the right dropped."""
        null = self.null_ids.to(device)
        if y is None:
            return null[None].expand(batch, -1)
        if not isinstance(y, Tensor) or y.ndim != 2 or y.shape[0] != batch or y.dtype not in (torch.int32,
                                                                                                 torch.int64):
            desc = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"y must be token rows [{batch}, L] (integer ids, right-padded); got {desc}")
        y = y.to(device=device, dtype=torch.long)
        uncaptioned = (y == self.pad_id).all(1)
        if bool(uncaptioned.any()):
            L = max(y.shape[1], null.shape[0])
            y = F.pad(y, (0, L - y.shape[1]), value=self.pad_id)
            null = F.pad(null, (0, L - null.shape[0]), value=self.pad_id)
            y = torch.where(uncaptioned[:, None], null[None], y)
        # Keep every column up to the last one holding a real token in any row (the encoder then
        # checks that each row is right-padded).
        used = (y != self.pad_id).any(0).nonzero()
        return y[:, : int(used[-1]) + 1] if used.numel() else y

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        if context is not None or context_mask is not None:
            raise ValueError("a TextConditioned model makes its context from the token rows y; pass y, not context")
        if not isinstance(x, Tensor) or x.ndim < 1:
            raise ValueError(f"x must be a batch tensor [B, ...]; got {type(x).__name__}")
        ids = self.captions(y, x.shape[0], x.device)
        context, context_mask = self.encoder(ids)
        extra = {}
        if self.word_rows is not None:
            extra["embedding"] = self.word_rows(ids)
        if self.layout is not None:
            extra["spatial"] = self.layout(ids, x.shape[-2], x.shape[-1])
        return self.denoiser(x, t, context=context, context_mask=context_mask, **extra)

    def num_parameters(self) -> int:
        """The number of trainable parameters (encoder and denoiser)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
