"""The image grids: the canvas against one built by hand, its default layout, its argument
checks, the PNG of ``save_grid`` (the same canvas as bytes) and drawing on an Axes."""

import math

import numpy as np
import pytest
import torch

from stepdiff.figures import image_grid, show_grid
from stepdiff.runs import save_grid


def _images(n, C, H, W, seed=0):
    """Random images, some pixels outside [-1, 1] so that the clamp is exercised."""
    return 1.5 * torch.randn(n, C, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("nrow", [3, 4, 9])
def test_each_cell_holds_its_image_and_the_borders_are_white(C, nrow):
    n, H, W = 7, 5, 3  # odd sizes; the last row is not full for nrow 3 and 4
    x = _images(n, C, H, W, seed=C + nrow)
    canvas = image_grid(x, nrow=nrow)
    rows = math.ceil(n / nrow)
    assert canvas.shape == (rows * (H + 1) + 1, nrow * (W + 1) + 1, C)
    assert canvas.dtype == torch.float32
    expected = torch.ones_like(canvas)  # built independently: white everywhere, then each cell
    covered = torch.zeros(canvas.shape[:2], dtype=torch.bool)
    for k in range(n):
        top, left = 1 + (k // nrow) * (H + 1), 1 + (k % nrow) * (W + 1)
        cell = canvas[top : top + H, left : left + W]
        want = ((x[k].clamp(-1, 1) + 1) / 2).permute(1, 2, 0)
        assert torch.equal(cell, want), f"cell {k}"
        expected[top : top + H, left : left + W] = want
        covered[top : top + H, left : left + W] = True
    assert torch.equal(canvas, expected)
    assert bool((canvas[~covered] == 1).all()), "borders and empty cells are white"
    assert float(canvas.min()) == 0.0 and float(canvas.max()) == 1.0  # clamped values reach both ends


def test_the_pad_and_the_input_dtype():
    x = _images(5, 1, 4, 6, seed=1)
    assert image_grid(x, nrow=5, pad=0).shape == (4, 30, 1)
    assert torch.equal(image_grid(x, nrow=5, pad=0)[:, 6:12, 0], (x[1, 0].clamp(-1, 1) + 1) / 2)
    assert image_grid(x, nrow=2, pad=3).shape == (3 * (4 + 3) + 3, 2 * (6 + 3) + 3, 1)
    assert torch.equal(image_grid(x.double()), image_grid(x))
    assert torch.equal(image_grid(x.requires_grad_()), image_grid(x.detach()))  # no grad needed


@pytest.mark.parametrize(("n", "nrow"), [(1, 1), (2, 2), (4, 2), (5, 3), (7, 3), (9, 3), (10, 4), (16, 4), (17, 5)])
def test_the_default_grid_is_square_ish(n, nrow):
    canvas = image_grid(_images(n, 1, 2, 2), nrow=None)
    assert canvas.shape[1] == nrow * 3 + 1
    assert canvas.shape[0] == math.ceil(n / nrow) * 3 + 1


@pytest.mark.parametrize(
    ("images", "kwargs", "names"),
    [
        (torch.zeros(1, 8, 8), {}, "images"),  # 3-D: one image without its batch axis
        ([[[[0.0]]]], {}, "images"),  # not a tensor
        (torch.zeros(2, 2, 8, 8), {}, "C = 1"),
        (torch.zeros(0, 1, 8, 8), {}, "n = 0"),
        (torch.zeros(4, 1, 8, 8), {"nrow": 0}, "nrow"),
        (torch.zeros(4, 1, 8, 8), {"nrow": -2}, "nrow"),
        (torch.zeros(4, 1, 8, 8), {"nrow": 2.5}, "nrow"),
        (torch.zeros(4, 1, 8, 8), {"pad": -1}, "pad"),
    ],
)
def test_bad_input_is_named(images, kwargs, names):
    with pytest.raises(ValueError, match=names):
        image_grid(images, **kwargs)


def _read_png(path):
    try:
        from PIL import Image
    except ImportError:  # matplotlib reads PNGs as floats in [0, 1]
        import matplotlib.image

        return np.round(matplotlib.image.imread(path) * 255).astype(np.uint8)
    return np.asarray(Image.open(path))


@pytest.mark.parametrize(("C", "nrow", "scale"), [(1, None, 1), (3, 3, 1), (1, 4, 3), (3, None, 2)])
def test_save_grid_writes_the_canvas_as_bytes(tmp_path, C, nrow, scale):
    x = _images(7, C, 5, 3, seed=10 + C)
    path = save_grid(x, tmp_path / "grid.png", nrow=nrow, scale=scale)
    expected = (image_grid(x, nrow=nrow) * 255).round().to(torch.uint8).numpy()
    expected = expected.repeat(scale, axis=0).repeat(scale, axis=1)  # each pixel a scale x scale square
    got = _read_png(path)
    assert got.shape == (expected.shape[:2] if C == 1 else expected.shape)
    assert np.array_equal(got, expected[..., 0] if C == 1 else expected)


def test_save_grid_rejects_what_image_grid_rejects(tmp_path):
    with pytest.raises(ValueError, match="C = 1"):
        save_grid(torch.zeros(2, 4, 8, 8), tmp_path / "grid.png")
    assert not (tmp_path / "grid.png").exists()


class _Axes:
    """Records the calls show_grid makes, so the test needs no matplotlib."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


@pytest.mark.parametrize("C", [1, 3])
def test_show_grid_draws_the_canvas_grey_or_colour(C):
    x = _images(6, C, 4, 4, seed=C)
    ax = _Axes()
    show_grid(x, ax, nrow=3, title="six")
    (name, args, kwargs), *rest = ax.calls
    assert name == "imshow"
    canvas = image_grid(x, nrow=3).numpy()
    assert np.array_equal(args[0], canvas[..., 0] if C == 1 else canvas)
    assert kwargs == {"cmap": "gray" if C == 1 else None, "vmin": 0, "vmax": 1, "interpolation": "nearest"}
    assert [c[0] for c in rest] == ["set_axis_off", "set_title"]
    assert rest[1][1] == ("six",) and rest[1][2] == {"fontsize": 9}
    ax = _Axes()
    show_grid(x, ax)
    assert [c[0] for c in ax.calls] == ["imshow", "set_axis_off"]  # no title, no set_title


def test_the_package_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, stepdiff.figures, stepdiff.runs; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_markdown_table_rows_escapes_and_errors():
    from stepdiff.figures import markdown_table

    got = markdown_table(["a", "b"], [[1, "x|y"], [2.5, "$|z|$"]])
    assert got.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | x\\|y |", "| 2.5 | $\\|z\\|$ |"]
    assert markdown_table(("only",), []) == "| only |\n| --- |"
    with pytest.raises(ValueError, match=r"rows\[1\] has 3 cells; the header has 2"):
        markdown_table(["a", "b"], [[1, 2], [1, 2, 3]])
    with pytest.raises(ValueError, match="header"):
        markdown_table([], [])


def test_table_shows_the_markdown(monkeypatch):
    """table() hands markdown_table's text to IPython's display as Markdown."""
    display = pytest.importorskip("IPython.display")
    from stepdiff.figures import markdown_table, table

    shown = []
    monkeypatch.setattr(display, "display", shown.append)
    table(["w", "FD"], [["1", "2.00"]])
    assert len(shown) == 1 and shown[0].data == markdown_table(["w", "FD"], [["1", "2.00"]])
