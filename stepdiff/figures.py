r"""Images as one picture, and numbers as one table: what the chapters show under their cells.

- {func}`image_grid`: tile images ``[n, C, H, W]`` in $[-1, 1]$ into one canvas in $[0, 1]$.
- {func}`show_grid`: draw that canvas on a matplotlib ``Axes``.
- {func}`markdown_table`: rows of formatted cells as a Markdown table; {func}`table` shows one.

matplotlib and IPython are not imported here: {func}`show_grid` only calls methods of the ``Axes``
it is given, and {func}`table` imports IPython when it is called, so the package imports without
either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["image_grid", "show_grid", "markdown_table", "table"]


def image_grid(images: Tensor, nrow: int | None = None, pad: int = 1) -> Tensor:
    r"""Tile images ``[n, C, H, W]`` (``C`` = 1 grey or 3 colour), with pixel values $x$ in
    $[-1, 1]$, into one float32 canvas ``[H', W', C]`` on the CPU, each pixel $u = (x + 1)/2$
    in $[0, 1]$ (values outside $[-1, 1]$ are clamped first).

    The images fill rows of ``nrow`` from the top left, in order; ``nrow`` defaults to
    $\lceil\sqrt n\,\rceil$, a square-ish grid. Every cell is framed by ``pad`` white pixels
    ($u = 1$), so the canvas has $H' = r(H + p) + p$ rows and $W' = \mathrm{nrow}\,(W + p) + p$
    columns, with $r = \lceil n / \mathrm{nrow}\rceil$ rows of images and $p$ = ``pad``; cells
    after the last image stay white.
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [n, C, H, W]; got {got}")
    n, C, H, W = images.shape
    if C not in (1, 3):
        raise ValueError(f"images must have C = 1 (grey) or 3 (colour) channels; got shape {tuple(images.shape)}")
    if n == 0:
        raise ValueError("images holds no image (n = 0)")
    if nrow is None:
        nrow = max(1, math.ceil(math.sqrt(n)))
    if int(nrow) != nrow or nrow < 1:
        raise ValueError(f"nrow must be a whole number of images per row, at least 1; got {nrow!r}")
    if int(pad) != pad or pad < 0:
        raise ValueError(f"pad must be a whole number of pixels, at least 0; got {pad!r}")
    nrow, pad = int(nrow), int(pad)
    rows = math.ceil(n / nrow)
    # float32 before the arithmetic, as the PNG of save_grid has always been computed: its
    # bytes stay the same whatever dtype or device the images come in.
    u = ((images.detach().float().clamp(-1, 1) + 1) / 2).cpu().permute(0, 2, 3, 1)
    canvas = torch.ones(rows * (H + pad) + pad, nrow * (W + pad) + pad, C)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        canvas[top : top + H, left : left + W] = u[i]
    return canvas


def show_grid(images: Tensor, ax, nrow: int | None = None, title: str | None = None):
    r"""Draw {func}`image_grid` of ``images`` (``[n, C, H, W]`` in $[-1, 1]$) on the matplotlib
    ``Axes`` ``ax``: grey for $C = 1$, on the fixed scale $u \in [0, 1]$ (black $x = -1$, white
    $x = 1$), without axes, under ``title`` if one is given. Returns the ``AxesImage``."""
    canvas = image_grid(images, nrow).numpy()
    grey = canvas.shape[-1] == 1
    # A fixed scale, not the images' own range: a grid of faint samples must look faint.
    # Nearest: a 16x16 digit drawn over many screen pixels stays 16x16 squares, not a blur.
    im = ax.imshow(canvas[..., 0] if grey else canvas, cmap="gray" if grey else None, vmin=0, vmax=1,
                   interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return im


def markdown_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """``header`` and ``rows`` (cells already formatted; each is shown as ``str(cell)``) as a
    Markdown table. A ``|`` inside a cell is escaped, so it cannot split the cell; a row with more
    or fewer cells than the header is an error naming it, never a table with shifted columns."""
    header = list(header)
    if not header:
        raise ValueError("header must name at least one column")
    rows = [list(row) for row in rows]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"rows[{i}] has {len(row)} cells; the header has {len(header)} columns")

    def line(cells: list) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + " --- |" * len(header), *map(line, rows)])


def table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> None:
    """Show {func}`markdown_table` of ``header`` and ``rows`` under a notebook cell."""
    from IPython.display import Markdown, display

    display(Markdown(markdown_table(header, rows)))
