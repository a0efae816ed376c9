r"""A caption's layout as a map over the image: each located object's words painted into its cell.

Cross-attention and a bag of words both leave the denoiser to work out which words go with which
place, and a small model trained for minutes binds them badly (chapter II.9 measures it). Layout
grounding (GLIGEN, Li et al. 2023; LLM-grounded diffusion, Lian et al. 2024) hands the denoiser the
binding instead: a planner turns the prompt into objects with places, and the image model is told,
at every pixel, which object belongs there. Here the planner is the caption grammar itself
({func}`stepdiff.shapes.locate_caption` gives every object of a prompt a cell that satisfies its
relations), and {class}`LayoutRows` reads the places back from the token ids, so the model stays
``model(x, t, y=token_ids)``.

For object $k$ of a caption (its words run from its article "a"/"an" to the next object's), with
attribute words $A_k$ (its size, colour and shape) and location words naming cell $c_k$ of the
3x3 grid, the map at pixel $p$ is

$$g(p) = \sum_{k\ \text{located}} [\,\mathrm{cell}(p) = c_k\,] \sum_{w \in A_k} R[w],$$

with $R \in \mathbb R^{V \times C}$ a free row per word drawn from $\mathcal N(0, 1)$, $C$ the UNet's
base width, and $\mathrm{cell}(p)$ the third of the image side the pixel centre falls in, per
axis. An object whose caption names no place (a relational caption's pair) adds nothing: the map
is zero there, as it is for the empty caption (so classifier-free guidance's unconditional
branch gets no layout). The UNet adds $g$ to its first feature map ({class}`~stepdiff.models.unet.UNet`,
``spatial=``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayoutRows", "GRID"]

GRID = 3  # cells per side: the shapes data's 3x3 grid


class LayoutRows(nn.Module):
    r"""Token rows ``[B, L]`` to the layout map $g$ ``[B, channels, H, W]`` of the module docstring.

    ``tokens``: the tokenizer's vocabulary in id order (``tokens[i]`` is the word of id $i$); the
    articles open objects, the shapes data's sizes, colours and shapes are the attribute words, and
    "top", "bottom", "left", "right" and "centre" name the cell: row 0 with "top", 2 with
    "bottom", else 1; column 0 with "left", 2 with "right", else 1. "left" or "right" followed by
    "of" is a relation, not a place. ``objects``: how many objects a caption may locate (words of
    later objects are ignored). ``pad_id``: the padding id.
    """

    def __init__(self, tokens: Sequence[str], channels: int, pad_id: int, *, objects: int = 3) -> None:
        super().__init__()
        from ..shapes import COLOURS, SHAPES, SIZES

        tokens = list(tokens)
        if not tokens or not all(isinstance(w, str) for w in tokens):
            raise ValueError("tokens must be the vocabulary as a non-empty sequence of words")
        for name, value in (("channels", channels), ("objects", objects)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < len(tokens):
            raise ValueError(f"pad_id must be a token id in 0..{len(tokens) - 1}; got {pad_id!r}")
        needed = ("a", "an", "of", "top", "bottom", "left", "right", "centre")
        missing = [w for w in needed if w not in tokens]
        if missing:
            raise ValueError(f"tokens lacks the words {missing}: the layout is read from the shapes caption grammar")
        index = {w: i for i, w in enumerate(tokens)}

        def ids(words: Sequence[str]) -> Tensor:
            return torch.tensor([index[w] for w in words if w in index], dtype=torch.long)

        self.pad_id, self.objects, self.channels, self.vocab_size = pad_id, objects, channels, len(tokens)
        self.of_id = index["of"]
        for name, words in (("start_ids", ("a", "an")), ("attribute_ids", (*SIZES, *COLOURS, *SHAPES)),
                            ("top_ids", ("top",)), ("bottom_ids", ("bottom",)), ("left_ids", ("left",)),
                            ("right_ids", ("right",)), ("centre_ids", ("centre",))):
            self.register_buffer(name, ids(words), persistent=False)
        self.rows = nn.Embedding(len(tokens), channels)

    def forward(self, ids: Tensor, height: int, width: int) -> Tensor:
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            desc = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be token rows [B, L] of integer ids; got {desc}")
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < GRID:
                raise ValueError(f"{name} must be an integer >= {GRID} (one pixel per cell at least); got {value!r}")
        ids = ids.long()
        cells, located = self.cells(ids)  # [B, K] each
        member = self.members(ids) & torch.isin(ids, self.attribute_ids)[..., None]  # [B, L, K]
        words = torch.einsum("blk,blc->bkc", member.float(), self.rows(ids).float())  # [B, K, C]
        at = F.one_hot(cells, GRID * GRID).float() * located[..., None].float()  # [B, K, 9]
        grid = torch.einsum("bkn,bkc->bnc", at, words)  # [B, 9, C]
        pixel_cell = (_thirds(height, ids.device)[:, None] * GRID + _thirds(width, ids.device)[None, :]).reshape(-1)
        return grid[:, pixel_cell].transpose(1, 2).reshape(ids.shape[0], self.channels, height, width)

    def members(self, ids: Tensor) -> Tensor:
        """``[B, L, K]`` bool: token $i$ belongs to object $k$ (after its $k$-th article, before the next)."""
        opened = torch.isin(ids, self.start_ids).long().cumsum(1) - 1  # -1 before the first article
        real = ids != self.pad_id
        return (opened[..., None] == torch.arange(self.objects, device=ids.device)) & real[..., None]

    def cells(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``([B, K] cell ids 0..8, [B, K] bool located)``: the cell each object's location words name,
        and whether it has any (an unlocated object's cell is 4, unused)."""
        member = self.members(ids)
        relation = torch.zeros_like(ids, dtype=torch.bool)
        relation[:, :-1] = ids[:, 1:] == self.of_id  # "left of", "right of"

        def named(buf: Tensor, drop_relations: bool = False) -> Tensor:  # [B, K]: the object has the word
            word = torch.isin(ids, buf) & ~(relation if drop_relations else torch.zeros_like(relation))
            return (member & word[..., None]).any(1)

        top, bottom, centre = named(self.top_ids), named(self.bottom_ids), named(self.centre_ids)
        left, right = named(self.left_ids, True), named(self.right_ids, True)
        row = torch.where(top, 0, torch.where(bottom, 2, 1))
        col = torch.where(left, 0, torch.where(right, 2, 1))
        return (row * GRID + col).long(), top | bottom | left | right | centre


def _thirds(n: int, device: torch.device) -> Tensor:
    r"""The grid cell (0, 1, 2) of each of ``n`` pixel centres along one axis: $\lfloor 3(i + \frac12)/n \rfloor$."""
    i = torch.arange(n, device=device)
    return torch.div((2 * GRID) * i + GRID, 2 * n, rounding_mode="floor")
