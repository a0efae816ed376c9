r"""The "shapes" dataset: procedural scenes of coloured objects on a 3x3 grid, with captions.

Nothing is downloaded: every image is drawn from its seed and index. A **scene** holds one to
three objects, each with independent attributes

- a shape from {data}`SHAPES`, a colour from {data}`COLOURS`, a size from {data}`SIZES`,
- a cell of the 3x3 grid {data}`CELLS` (row-major from the top left), at most one object per cell,
- jitter: an offset of the centre inside its cell, a scale and a rotation,

drawn in order (a later object covers an earlier one where they overlap), on a background
from {data}`BACKGROUNDS` (plain, a linear gradient, low-contrast stripes, or smooth value noise)
whose near-grey colours keep every object colour visible.

**Rendering.** Each shape is a signed distance function $d(p)$ (negative inside), evaluated at
the pixel centres in the object's own frame: with centre $c$, rotation $R_\theta$ and radius
$r$ (pixels), $d_{\rm px}(p) = r\,d\big(R_{-\theta}(p - c)/r\big)$. Its anti-aliased coverage
of the pixel is the box-filtered edge

$$a(p) = \operatorname{clip}\big(\tfrac12 - d_{\rm px}(p),\ 0,\ 1\big),$$

exact for a straight edge crossing the pixel. Objects are composited front to back in drawing
order, $x \leftarrow (1 - a_k)\,x + a_k\,c_k$, so object $k$'s **visible** mask is
$m_k = a_k\prod_{j>k}(1 - a_j)$ and the image is $x = \big(1 - \sum_k m_k\big)\,b + \sum_k m_k c_k$
($b$ the background). The **edge map** is the morphological gradient of the visible masks,
$e = \max_k\,(\operatorname{dilate}_{3\times3} m_k - \operatorname{erode}_{3\times3} m_k)$.
Images are rounded to 8 bits, $u = \lfloor 255x + \tfrac12\rfloor$, and returned as
$u/127.5 - 1\in[-1, 1]$.

**Determinism.** Scene $i$ of seed $s$ is drawn from a counter-based hash (SplitMix64) of
$(s, i, \text{stream})$, never from a shared generator, so it does not depend on which other
scenes are drawn with it: the same seed and index give the same scene and the bit-identical
image at any batch size. Per-pixel arithmetic uses only correctly rounded operations
($+,-,\times,/,\sqrt{\ }$, min, max, floor) so vectorised and scalar code paths agree; the few
sines and cosines are taken per object with Python's ``math``.

**Labels, captions, targets.**

- ``labels``: the index in {data}`SHAPES` of the first object's shape (the first object is the
  first one drawn and the first one the caption names). For one-object scenes it is *the* shape.
- ``targets [N, 9, 3]``: per cell, ``(shape, colour, size)`` ids, ``0`` for an empty cell and
  ``1 + index`` into {data}`SHAPES`, {data}`COLOURS`, {data}`SIZES`.
- Captions come from a small grammar ({func}`caption`, parsed back by {func}`parse_caption`):

```text
caption  := clause (("," | "and" | ", and") clause)*
clause   := object [relation object]
object   := ("a" | "an") [size] [colour] shape [location]
location := "at the" cell | "on the left" | "on the right" | "in the centre"
relation := "left of" | "right of" | "above" | "below"
```

{func}`caption` always writes the size and colour, and either every object's location
(style ``"positional"``: "a small red circle at the top left", "a small white star at the
top, a large cyan ring on the left and a small orange heart at the bottom right") or, for the
first two objects, their relation (style ``"relational"``: "a large blue square left of a
small green triangle", with a third object located: "... and a small red cross at the
bottom"). A one-object caption always carries its location. The relation between two objects
is derived from their cells by {func}`relation`. Prompts may leave out sizes, colours and
locations ("a blue square left of a green triangle"); {func}`scene_from_caption` fills them in.

Entry points: {func}`make_shapes` (a dataset of ``n`` seeded scenes), {func}`sample_scenes`
(the records only), {func}`render` (images, masks, edges of given records),
{func}`shapes_from_scenes` and {func}`shapes_from_captions` (a dataset for explicit records
or prompts, so every prompt has a matching real image).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SHAPES",
    "COLOURS",
    "COLOUR_RGB",
    "SIZES",
    "SIZE_RADIUS",
    "CELLS",
    "RELATIONS",
    "BACKGROUNDS",
    "MAX_OBJECTS",
    "CAPTION_STYLES",
    "CAPTION_WORDS",
    "WORD_ALIASES",
    "MAX_CAPTION_WORDS",
    "ShapeObject",
    "Background",
    "Scene",
    "CaptionObject",
    "CaptionSpec",
    "Rendering",
    "ShapesDataset",
    "relation",
    "sample_scenes",
    "render",
    "render_background",
    "make_shapes",
    "shapes_from_scenes",
    "shapes_from_captions",
    "caption",
    "parse_caption",
    "scene_from_caption",
    "locate_caption",
    "locate_captions",
    "scene_targets",
    "class_label",
    "count_combinations",
]

f32 = torch.float32

# --- vocabularies -----------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross", "star", "diamond", "heart", "ring")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
# Saturated (or, for white, bright) colours, far from the near-grey backgrounds (see _BG_*).
COLOUR_RGB = {
    "red": (0.88, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.98, 0.90, 0.08),
    "green": (0.10, 0.72, 0.18),
    "cyan": (0.05, 0.85, 0.92),
    "blue": (0.12, 0.28, 0.95),
    "purple": (0.60, 0.15, 0.85),
    "white": (0.98, 0.98, 0.98),
}
SIZES = ("small", "large")
# Radius of each size, in cell widths (a cell is a third of the image side); the shapes'
# unit outlines below fit in a disc of radius about 1, so a large object spans about a cell.
SIZE_RADIUS = {"small": 0.35, "large": 0.55}
CELLS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUNDS = ("plain", "gradient", "stripes", "noise")
MAX_OBJECTS = 3
CAPTION_STYLES = ("positional", "relational", "shape")

# Jitter, drawn uniformly: centre offset in cell widths (objects at the border are then pushed
# inwards to stay in frame, see _keep_in_frame), relative scale, rotation in degrees.
JITTER_OFFSET = 0.12
JITTER_SCALE = 0.08
JITTER_ANGLE = 15.0
# Backgrounds: a grey level g, a per-channel tint, and a texture amplitude; every background
# pixel lies in [g - tint - amp/2, g + tint + amp/2] per channel, inside [0.21, 0.67].
_BG_GREY = (0.32, 0.56)
_BG_TINT = 0.05
_BG_AMP = (0.06, 0.12)
_NOISE_LATTICE = 6  # value-noise lattice points per side

_ARTICLE_AN = {w for w in (*SIZES, *COLOURS, *SHAPES) if w[0] in "aeiou"}
_LOCATION_WORDS = ("at", "on", "in", "the", "top", "bottom", "left", "right", "centre")
CAPTION_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(["a", "an", *SIZES, *COLOURS, *SHAPES, *_LOCATION_WORDS, "of", "above", "below", "and"])
)
"""Every word {func}`caption` can write (the tokenizer's vocabulary, {mod}`stepdiff.text`)."""

WORD_ALIASES = {"center": "centre", "middle": "centre"}
"""Words a prompt may use for a grammar word (read as that word by the parser and the tokenizer)."""
# The longest caption: three located objects, each "a <size> <colour> <shape> at the <a> <b>" (8 words),
# joined by commas and one "and"; a relational caption names fewer locations, so it is shorter.
MAX_CAPTION_WORDS = MAX_OBJECTS * 8 + 1


def _check_choice(kind: str, value: object, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(options)}")
    return value


def _cell_index(cell: int | str) -> int:
    if isinstance(cell, str):
        name = WORD_ALIASES.get(cell, cell)
        if name not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; choose one of {', '.join(CELLS)} or an index 0..8")
        return CELLS.index(name)
    if isinstance(cell, bool) or not isinstance(cell, (int, np.integer)) or not 0 <= int(cell) < 9:
        raise ValueError(f"cell must be an index 0..8 or one of {', '.join(CELLS)}; got {cell!r}")
    return int(cell)


def relation(cell_a: int | str, cell_b: int | str) -> str:
    r"""Where object A is relative to object B, from their cells: one of {data}`RELATIONS`.

    With $(r, c)$ the row and column of a cell and $\Delta = (r_A - r_B,\ c_A - c_B)$: a
    horizontal relation when $|\Delta c| \ge |\Delta r|$ ("left of" if $\Delta c < 0$,
    else "right of"), a vertical one otherwise ("above" if $\Delta r < 0$, else "below").
    A diagonal neighbour is therefore "left of" / "right of". The cells must differ.
    """
    a, b = _cell_index(cell_a), _cell_index(cell_b)
    if a == b:
        raise ValueError(f"two objects cannot share a cell; both are in {CELLS[a]!r}")
    dr, dc = a // 3 - b // 3, a % 3 - b % 3
    if abs(dc) >= abs(dr):
        return "left of" if dc < 0 else "right of"
    return "above" if dr < 0 else "below"


# --- records ----------------------------------------------------------------------------------


def _check_real(name: str, value: float, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}]; got {value!r}")
    value = float(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}]; got {value}")
    return value


@dataclass(frozen=True)
class ShapeObject:
    r"""One object: its attributes, its cell (an index 0..8 or a name from {data}`CELLS`), and
    its jitter: centre offset ``(dx, dy)`` in cell widths from the cell's centre (at most half a
    cell), ``scale`` relative to {data}`SIZE_RADIUS`, and ``angle`` in degrees (counter-clockwise).
    """

    shape: str
    colour: str
    size: str
    cell: int | str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("size", self.size, SIZES)
        object.__setattr__(self, "cell", _cell_index(self.cell))
        object.__setattr__(self, "dx", _check_real("dx", self.dx, -0.5, 0.5))
        object.__setattr__(self, "dy", _check_real("dy", self.dy, -0.5, 0.5))
        object.__setattr__(self, "scale", _check_real("scale", self.scale, 0.5, 1.5))
        object.__setattr__(self, "angle", _check_real("angle", self.angle, -360.0, 360.0))

    @property
    def cell_name(self) -> str:
        return CELLS[self.cell]


@dataclass(frozen=True)
class Background:
    r"""A background: ``kind`` from {data}`BACKGROUNDS` and its parameters (RGB in $[0, 1]$).

    - ``plain``: ``colour`` everywhere.
    - ``gradient``: from ``colour`` to ``colour2`` along the direction ``angle`` (degrees).
    - ``stripes``: ``colour`` plus ``amplitude`` times a triangle wave of ``frequency`` periods
      per image side along ``angle``, shifted by ``phase`` (in periods).
    - ``noise``: ``colour`` plus ``amplitude`` times smooth value noise whose lattice values are
      hashed from ``seed``.

    Parameters a kind does not use are ignored.
    """

    kind: str = "plain"
    colour: tuple[float, float, float] = (0.45, 0.45, 0.45)
    colour2: tuple[float, float, float] = (0.45, 0.45, 0.45)
    angle: float = 0.0
    frequency: float = 0.0
    phase: float = 0.0
    amplitude: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("background kind", self.kind, BACKGROUNDS)
        for name in ("colour", "colour2"):
            rgb = getattr(self, name)
            if not isinstance(rgb, (tuple, list, np.ndarray)) or len(rgb) != 3:
                raise ValueError(f"background {name} must be 3 numbers in [0, 1]; got {rgb!r}")
            object.__setattr__(self, name, tuple(_check_real(f"background {name}", c, 0.0, 1.0) for c in rgb))
        object.__setattr__(self, "angle", _check_real("background angle", self.angle, -360.0, 360.0))
        object.__setattr__(self, "frequency", _check_real("background frequency", self.frequency, 0.0, 64.0))
        object.__setattr__(self, "phase", _check_real("background phase", self.phase, -1.0, 1.0))
        object.__setattr__(self, "amplitude", _check_real("background amplitude", self.amplitude, 0.0, 0.5))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**64:
            raise ValueError(f"background seed must be an integer in [0, 2**64); got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))


@dataclass(frozen=True)
class Scene:
    """One to {data}`MAX_OBJECTS` objects in distinct cells, in drawing (and caption) order."""

    objects: tuple[ShapeObject, ...]
    background: Background = field(default_factory=Background)

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        if not 1 <= len(objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects; got {len(objects)}")
        if not all(isinstance(o, ShapeObject) for o in objects):
            raise ValueError("a scene's objects must be ShapeObject records")
        cells = [o.cell for o in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"at most one object per cell; got cells {[CELLS[c] for c in cells]}")
        if not isinstance(self.background, Background):
            raise ValueError(f"background must be a Background record; got {type(self.background).__name__}")
        object.__setattr__(self, "objects", objects)


def class_label(scene: Scene) -> int:
    r"""The scene's class label: the index in {data}`SHAPES` of its first object's shape,
    $y \in \{0, \dots, K - 1\}$ with $K$ the number of shapes."""
    return SHAPES.index(scene.objects[0].shape)


def scene_targets(scenes: Sequence[Scene]) -> Tensor:
    r"""``LongTensor [N, 9, 3]``: per cell ``(shape, colour, size)``, 0 empty, else 1 + index:
    $T_{n,c} = (1 + i_{\rm shape}, 1 + i_{\rm colour}, 1 + i_{\rm size})$ for the object of scene $n$ in cell
    $c$ (indices into {data}`SHAPES`, {data}`COLOURS`, {data}`SIZES`), $T_{n,c} = (0, 0, 0)$ for an empty cell."""
    if isinstance(scenes, Scene):
        scenes = [scenes]
    return _Arrays.from_scenes(scenes).targets()


def count_combinations(n_objects: int | tuple[int, int] = (1, MAX_OBJECTS), *, ordered: bool = True) -> int:
    r"""The number of distinct attribute combinations (jitter and background not counted).

    With $A = |\text{SHAPES}|\,|\text{COLOURS}|\,|\text{SIZES}|$ attribute triples per object
    and $k$ objects in distinct cells of 9: $\sum_k 9!/(9-k)!\;A^k$ ordered (the drawing and
    caption order is part of the scene), or $\sum_k \binom 9k A^k$ unordered (distinct
    ``targets``).
    """
    lo, hi = _object_range(n_objects)
    a = len(SHAPES) * len(COLOURS) * len(SIZES)
    per_k = math.perm if ordered else math.comb
    return sum(per_k(9, k) * a**k for k in range(lo, hi + 1))


# --- counter-based randomness -----------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that scrambles every bit (wraps mod 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _keys(seed: int, index: np.ndarray) -> np.ndarray:
    """One uint64 key per scene from (seed, index)."""
    s = _mix(np.array([seed], dtype=np.uint64) + _GOLDEN)
    return _mix(index.astype(np.uint64) * _GOLDEN ^ s)


def _uniform(keys: np.ndarray, stream: int | np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) (53 bits), one per key, independent across streams."""
    h = _mix(keys + (np.atleast_1d(np.asarray(stream, dtype=np.uint64)) + np.uint64(1)) * _GOLDEN)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


# Stream numbers: each random quantity of a scene has its own, so adding one never shifts another.
_S_COUNT, _S_STYLE, _S_SPEC_CELLS = 0, 1, 2
_S_CELLS = 10  # 10..18
_S_OBJECT = 20  # + 10 * slot + attribute
_S_BG = 60  # 60..79


def _object_range(n_objects: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(n_objects, (int, np.integer)) and not isinstance(n_objects, bool):
        lo = hi = int(n_objects)
    elif isinstance(n_objects, tuple) and len(n_objects) == 2 and all(isinstance(v, int) for v in n_objects):
        lo, hi = n_objects
    else:
        raise ValueError(f"n_objects must be an integer or a (min, max) pair of integers; got {n_objects!r}")
    if not 1 <= lo <= hi <= MAX_OBJECTS:
        raise ValueError(f"n_objects must lie in 1..{MAX_OBJECTS} (with min <= max); got {n_objects!r}")
    return lo, hi


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative integer below 2**63; got {seed!r}")
    return int(seed)


def _check_count(name: str, n: int, lo: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {n!r}")
    return int(n)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= 1024:
        raise ValueError(f"size (the image side in pixels) must be an integer in 8..1024; got {size!r}")
    return int(size)


# --- scenes as arrays -------------------------------------------------------------------------


@dataclass
class _Arrays:
    """A batch of scenes as arrays (slots beyond an image's object count hold -1 / 0)."""

    shape: np.ndarray  # [N, 3] int, -1 absent
    colour: np.ndarray
    size: np.ndarray
    cell: np.ndarray
    dx: np.ndarray  # [N, 3] float64
    dy: np.ndarray
    scale: np.ndarray
    angle: np.ndarray
    bg_kind: np.ndarray  # [N] int
    bg_colour: np.ndarray  # [N, 3] float64
    bg_colour2: np.ndarray
    bg_angle: np.ndarray  # [N]
    bg_frequency: np.ndarray
    bg_phase: np.ndarray
    bg_amplitude: np.ndarray
    bg_seed: np.ndarray  # [N] uint64

    def __len__(self) -> int:
        return len(self.bg_kind)

    @classmethod
    def from_scenes(cls, scenes: Sequence[Scene]) -> _Arrays:
        n = len(scenes)
        ints = {k: np.full((n, MAX_OBJECTS), -1, dtype=np.int64) for k in ("shape", "colour", "size", "cell")}
        reals = {k: np.zeros((n, MAX_OBJECTS)) for k in ("dx", "dy", "scale", "angle")}
        reals["scale"][:] = 1.0
        bg = {k: np.zeros(n) for k in ("bg_angle", "bg_frequency", "bg_phase", "bg_amplitude")}
        kind, c1, c2 = np.zeros(n, dtype=np.int64), np.zeros((n, 3)), np.zeros((n, 3))
        seeds = np.zeros(n, dtype=np.uint64)
        for i, s in enumerate(scenes):
            if not isinstance(s, Scene):
                raise ValueError(f"scenes must be Scene records; item {i} is a {type(s).__name__}")
            for k, o in enumerate(s.objects):
                ints["shape"][i, k] = SHAPES.index(o.shape)
                ints["colour"][i, k] = COLOURS.index(o.colour)
                ints["size"][i, k] = SIZES.index(o.size)
                ints["cell"][i, k] = o.cell
                for name in reals:
                    reals[name][i, k] = getattr(o, name)
            b = s.background
            kind[i] = BACKGROUNDS.index(b.kind)
            c1[i], c2[i] = b.colour, b.colour2
            bg["bg_angle"][i], bg["bg_frequency"][i] = b.angle, b.frequency
            bg["bg_phase"][i], bg["bg_amplitude"][i] = b.phase, b.amplitude
            seeds[i] = b.seed
        return cls(**ints, **reals, bg_kind=kind, bg_colour=c1, bg_colour2=c2, **bg, bg_seed=seeds)

    def scene(self, i: int) -> Scene:
        objects = tuple(
            ShapeObject(
                SHAPES[self.shape[i, k]],
                COLOURS[self.colour[i, k]],
                SIZES[self.size[i, k]],
                int(self.cell[i, k]),
                float(self.dx[i, k]),
                float(self.dy[i, k]),
                float(self.scale[i, k]),
                float(self.angle[i, k]),
            )
            for k in range(MAX_OBJECTS)
            if self.shape[i, k] >= 0
        )
        background = Background(
            BACKGROUNDS[self.bg_kind[i]],
            tuple(float(c) for c in self.bg_colour[i]),
            tuple(float(c) for c in self.bg_colour2[i]),
            float(self.bg_angle[i]),
            float(self.bg_frequency[i]),
            float(self.bg_phase[i]),
            float(self.bg_amplitude[i]),
            int(self.bg_seed[i]),
        )
        return Scene(objects, background)

    def targets(self) -> Tensor:
        """``[N, 9, 3]`` targets, as {func}`scene_targets`."""
        n = len(self)
        t = np.zeros((n, 9, 3), dtype=np.int64)
        rows, slots = np.nonzero(self.shape >= 0)
        cells = self.cell[rows, slots]
        for h, values in enumerate((self.shape, self.colour, self.size)):
            t[rows, cells, h] = 1 + values[rows, slots]
        return torch.from_numpy(t)

    def objects(self, i: int) -> list[tuple[str, str, str, int]]:
        """Scene ``i``'s objects as ``(shape, colour, size, cell)``, in drawing order."""
        return [
            (SHAPES[self.shape[i, k]], COLOURS[self.colour[i, k]], SIZES[self.size[i, k]], int(self.cell[i, k]))
            for k in range(MAX_OBJECTS)
            if self.shape[i, k] >= 0
        ]


class _SceneList(Sequence):
    """The scene records of an {class}`_Arrays`, built when read (50 000 records cost seconds)."""

    def __init__(self, arrays: _Arrays) -> None:
        self._arrays = arrays

    def __len__(self) -> int:
        return len(self._arrays)

    def __getitem__(self, i: int | slice) -> Scene | list[Scene]:
        if isinstance(i, slice):
            return [self._arrays.scene(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"scene index {i} out of range for {n} scenes")
        return self._arrays.scene(i % n)

    def __repr__(self) -> str:
        return f"<{len(self)} shapes scenes>"


def _sample_arrays(seed: int, index: np.ndarray, n_objects: tuple[int, int]) -> _Arrays:
    """Draw scenes ``index`` of ``seed``: every quantity from its own hashed stream."""
    n = len(index)
    keys = _keys(seed, index)
    lo, hi = n_objects
    count = lo + np.minimum((_uniform(keys, _S_COUNT) * (hi - lo + 1)).astype(np.int64), hi - lo)
    order = np.argsort(np.stack([_uniform(keys, _S_CELLS + c) for c in range(9)], 1), axis=1, kind="stable")
    present = np.arange(MAX_OBJECTS)[None, :] < count[:, None]

    def draw(slot: int, attr: int) -> np.ndarray:
        return _uniform(keys, _S_OBJECT + 10 * slot + attr)

    def choice(slot: int, attr: int, k: int) -> np.ndarray:
        return np.minimum((draw(slot, attr) * k).astype(np.int64), k - 1)

    cols = {name: np.full((n, MAX_OBJECTS), -1, dtype=np.int64) for name in ("shape", "colour", "size", "cell")}
    reals = {name: np.zeros((n, MAX_OBJECTS)) for name in ("dx", "dy", "scale", "angle")}
    reals["scale"][:] = 1.0
    for k in range(MAX_OBJECTS):
        p = present[:, k]
        cols["shape"][p, k] = choice(k, 0, len(SHAPES))[p]
        cols["colour"][p, k] = choice(k, 1, len(COLOURS))[p]
        cols["size"][p, k] = choice(k, 2, len(SIZES))[p]
        cols["cell"][p, k] = order[p, k]
        reals["dx"][p, k] = ((2 * draw(k, 3) - 1) * JITTER_OFFSET)[p]
        reals["dy"][p, k] = ((2 * draw(k, 4) - 1) * JITTER_OFFSET)[p]
        reals["scale"][p, k] = (1 + (2 * draw(k, 5) - 1) * JITTER_SCALE)[p]
        reals["angle"][p, k] = ((2 * draw(k, 6) - 1) * JITTER_ANGLE)[p]
    _keep_in_frame(cols, reals, present)

    def bg(j: int) -> np.ndarray:
        return _uniform(keys, _S_BG + j)

    kind = np.minimum((bg(0) * len(BACKGROUNDS)).astype(np.int64), len(BACKGROUNDS) - 1)
    grey = _BG_GREY[0] + (_BG_GREY[1] - _BG_GREY[0]) * bg(1)
    colour = grey[:, None] + np.stack([(2 * bg(2 + c) - 1) * _BG_TINT for c in range(3)], 1)
    grey2 = _BG_GREY[0] + (_BG_GREY[1] - _BG_GREY[0]) * bg(5)
    colour2 = grey2[:, None] + np.stack([(2 * bg(6 + c) - 1) * _BG_TINT for c in range(3)], 1)
    angle = 360.0 * bg(9) - 180.0
    frequency = 3.0 + 4.0 * bg(10)
    phase = bg(11)
    amplitude = _BG_AMP[0] + (_BG_AMP[1] - _BG_AMP[0]) * bg(12)
    tex_seed = _mix(keys + np.array([_S_BG + 13], dtype=np.uint64) * _GOLDEN)
    # Unused parameters are zero (or the base colour), so a record shows only what is drawn.
    is_gradient, is_stripes, is_noise = kind == 1, kind == 2, kind == 3
    colour2 = np.where(is_gradient[:, None], colour2, colour)
    angle = np.where(is_gradient | is_stripes, angle, 0.0)
    frequency = np.where(is_stripes, frequency, 0.0)
    phase = np.where(is_stripes, phase, 0.0)
    amplitude = np.where(is_stripes | is_noise, amplitude, 0.0)
    tex_seed = np.where(is_noise, tex_seed, np.uint64(0)).astype(np.uint64)
    return _Arrays(
        **cols,
        **reals,
        bg_kind=kind,
        bg_colour=colour,
        bg_colour2=colour2,
        bg_angle=angle,
        bg_frequency=frequency,
        bg_phase=phase,
        bg_amplitude=amplitude,
        bg_seed=tex_seed,
    )


# --- shape outlines (signed distance in the object's unit frame, y pointing down) --------------


def _length(x: Tensor, y: Tensor) -> Tensor:
    return torch.sqrt(x * x + y * y)


def _sd_box(x: Tensor, y: Tensor, hx: float, hy: float) -> Tensor:
    qx, qy = x.abs() - hx, y.abs() - hy
    return _length(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def _sd_polygon(x: Tensor, y: Tensor, vertices: Sequence[tuple[float, float]]) -> Tensor:
    r"""Signed distance to a simple polygon: the nearest edge's distance, negative inside.

    Distance to edge $a\to b$: $|w - e\,\mathrm{clip}(w\cdot e/e\cdot e, 0, 1)|$ with
    $w = p - a$, $e = b - a$; inside by the even-odd rule on a ray towards $+x$.
    """
    d2 = None
    inside = torch.zeros(x.shape, dtype=torch.bool)
    for (ax, ay), (bx, by) in zip(vertices, [*vertices[1:], vertices[0]]):
        ex, ey = bx - ax, by - ay
        wx, wy = x - ax, y - ay
        t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0)
        qx, qy = wx - t * ex, wy - t * ey
        dd = qx * qx + qy * qy
        d2 = dd if d2 is None else torch.minimum(d2, dd)
        if ey != 0.0:  # a horizontal edge never crosses the ray
            straddles = (y < ay) != (y < by)
            crossing_x = ax + wy * (ex / ey)
            inside ^= straddles & (x < crossing_x)
    dist = torch.sqrt(d2)
    return torch.where(inside, -dist, dist)


def _star_vertices(points: int, outer: float, inner: float) -> list[tuple[float, float]]:
    out = []
    for j in range(2 * points):
        r = outer if j % 2 == 0 else inner
        a = math.pi * j / points
        out.append((r * math.sin(a), -r * math.cos(a)))  # first point straight up
    return out


_TRIANGLE = [(0.0, -0.72), (0.84, 0.72), (-0.84, 0.72)]  # apex up, centred on its bounding box
_STAR_SHIFT = 0.5 * (1.05 - 1.05 * math.cos(math.pi / 5))  # centre the star's bounding box
_STAR = [(px, py + _STAR_SHIFT) for px, py in _star_vertices(5, 1.05, 0.5)]
_DIAMOND = [(0.0, -1.0), (0.64, 0.0), (0.0, 1.0), (-0.64, 0.0)]
_SQRT_HALF = math.sqrt(0.5)
_HEART_D = 0.74  # half-diagonal of the heart's square; its two lobes sit on the upper sides


def _sd_heart(x: Tensor, y: Tensor) -> Tensor:
    """A square on its corner (the point down) with two discs on its upper sides."""
    d = _HEART_D
    c0 = 0.1035 * d  # shifts the outline so its bounding box is centred
    yy = y - c0
    u, v = (x + yy) * _SQRT_HALF, (yy - x) * _SQRT_HALF  # rotated 45 degrees
    square = _sd_box(u, v, d * _SQRT_HALF, d * _SQRT_HALF)
    r = d * _SQRT_HALF
    lobe_y = yy + 0.5 * d
    left = _length(x + 0.5 * d, lobe_y) - r
    right = _length(x - 0.5 * d, lobe_y) - r
    return torch.minimum(square, torch.minimum(left, right))


_SDF = {
    "circle": lambda x, y: _length(x, y) - 0.88,
    "square": lambda x, y: _sd_box(x, y, 0.74, 0.74),
    "triangle": lambda x, y: _sd_polygon(x, y, _TRIANGLE),
    "cross": lambda x, y: torch.minimum(_sd_box(x, y, 0.95, 0.3), _sd_box(x, y, 0.3, 0.95)),
    "star": lambda x, y: _sd_polygon(x, y, _STAR),
    "diamond": lambda x, y: _sd_polygon(x, y, _DIAMOND),
    "heart": _sd_heart,
    "ring": lambda x, y: (_length(x, y) - 0.68).abs() - 0.24,
}
# Radius of the disc that holds each outline at any rotation (unit frame), to keep objects in frame.
_EXTENT = {
    "circle": 0.88,
    "square": 0.74 * math.sqrt(2),
    "triangle": max(math.hypot(px, py) for px, py in _TRIANGLE),
    "cross": math.hypot(0.95, 0.3),
    "star": max(math.hypot(px, py) for px, py in _STAR),
    "diamond": 1.0,
    "heart": 1.0,
    "ring": 0.92,
}
_MARGIN = 0.01  # of the image side, kept between an object's extent and the border


def _keep_in_frame(cols: dict, reals: dict, present: np.ndarray) -> None:
    r"""Clip sampled offsets so the disc that holds each object at any angle stays in the image.

    In cell widths, an object in column (or row) $j$ with offset $d$ has its centre at
    $j + \tfrac12 + d$ and reaches $e$ (extent times radius times scale, plus a margin) from it,
    so $e - (j + \tfrac12) \le d \le 3 - e - (j + \tfrac12)$: a large object in a border cell
    is pushed inwards by up to about 0.2 cell widths, past the jitter range.
    """
    extent = np.array([_EXTENT[s] for s in SHAPES])
    radius = np.array([SIZE_RADIUS[s] for s in SIZES])
    for k in range(MAX_OBJECTS):
        p = present[:, k]
        e = extent[cols["shape"][p, k]] * radius[cols["size"][p, k]] * reals["scale"][p, k] + 3 * _MARGIN
        for name, pos in (("dx", cols["cell"][p, k] % 3), ("dy", cols["cell"][p, k] // 3)):
            reals[name][p, k] = np.clip(reals[name][p, k], e - (pos + 0.5), 3 - e - (pos + 0.5))


# --- rendering --------------------------------------------------------------------------------


class Rendering(NamedTuple):
    """``images [N, 3, H, W]`` in $[-1, 1]$; visible ``masks [N, 3, H, W]`` and ``edges [N, 1, H, W]``
    in $[0, 1]$ (``None`` when not asked for)."""

    images: Tensor
    masks: Tensor | None
    edges: Tensor | None


def _background(a: _Arrays, rows: np.ndarray, size: int) -> Tensor:
    """Background colours ``[n, 3, H, W]`` in [0, 1] for scenes ``rows`` of ``a``."""
    n = len(rows)
    coords = (torch.arange(size, dtype=f32) + 0.5) / size - 0.5  # pixel centres, image centre 0
    X, Y = coords[None, None, :], coords[None, :, None]
    base = torch.from_numpy(a.bg_colour[rows]).to(f32)[:, :, None, None]
    out = base.expand(n, 3, size, size).clone()
    kind = a.bg_kind[rows]
    angle = a.bg_angle[rows]
    ux = torch.tensor([math.cos(math.radians(v)) for v in angle], dtype=f32)[:, None, None]
    uy = torch.tensor([-math.sin(math.radians(v)) for v in angle], dtype=f32)[:, None, None]
    proj = X * ux + Y * uy  # [n, H, W], position along the direction, in image sides
    amp = torch.from_numpy(a.bg_amplitude[rows]).to(f32)[:, None, None]
    for j, name in enumerate(BACKGROUNDS):
        sel = np.flatnonzero(kind == j)
        if name == "plain" or len(sel) == 0:
            continue
        idx = torch.from_numpy(sel)
        if name == "gradient":
            s = (proj[idx] * _SQRT_HALF + 0.5).clamp(0.0, 1.0)[:, None]  # 0..1 corner to corner
            c2 = torch.from_numpy(a.bg_colour2[rows[sel]]).to(f32)[:, :, None, None]
            out[idx] = out[idx] * (1.0 - s) + c2 * s
        elif name == "stripes":
            freq = torch.from_numpy(a.bg_frequency[rows[sel]]).to(f32)[:, None, None]
            phase = torch.from_numpy(a.bg_phase[rows[sel]]).to(f32)[:, None, None]
            u = proj[idx] * freq + phase
            wave = (u - torch.floor(u) - 0.5).abs() * 2.0 - 0.5  # triangle wave in [-1/2, 1/2]
            out[idx] = out[idx] + (amp[idx] * wave)[:, None]
        else:
            g = _NOISE_LATTICE
            lattice_keys = a.bg_seed[rows[sel]][:, None] + np.arange(g * g, dtype=np.uint64)[None, :] * _GOLDEN
            values = torch.from_numpy((_mix(lattice_keys) >> np.uint64(40)).astype(np.float64) / 2**24)
            values = values.to(f32).reshape(len(sel), g, g)
            u = (coords + 0.5) * (g - 1)
            i0 = torch.floor(u).long().clamp(max=g - 2)
            t = u - i0.to(f32)
            t = t * t * (3.0 - 2.0 * t)  # smoothstep between lattice points
            rows0, rows1 = values[:, i0], values[:, i0 + 1]  # [m, H, g]
            top = rows0[:, :, i0] * (1.0 - t[None, None, :]) + rows0[:, :, i0 + 1] * t[None, None, :]
            bot = rows1[:, :, i0] * (1.0 - t[None, None, :]) + rows1[:, :, i0 + 1] * t[None, None, :]
            v = top * (1.0 - t[None, :, None]) + bot * t[None, :, None] - 0.5
            out[idx] = out[idx] + (amp[idx] * v)[:, None]
    return out


def _coverage(a: _Arrays, rows: np.ndarray, slot: int, size: int) -> Tensor:
    """Anti-aliased coverage ``[n, H, W]`` of object ``slot`` (zero where absent)."""
    n = len(rows)
    cov = torch.zeros(n, size, size, dtype=f32)
    coords = (torch.arange(size, dtype=f32) + 0.5) / size
    X, Y = coords[None, None, :], coords[None, :, None]
    shape = a.shape[rows, slot]
    for j, name in enumerate(SHAPES):
        sel = np.flatnonzero(shape == j)
        if len(sel) == 0:
            continue
        r_ = rows[sel]
        cell = a.cell[r_, slot]
        cx = (cell % 3 + 0.5 + a.dx[r_, slot]) / 3.0
        cy = (cell // 3 + 0.5 + a.dy[r_, slot]) / 3.0
        radius = np.array([SIZE_RADIUS[SIZES[s]] for s in a.size[r_, slot]]) * a.scale[r_, slot] / 3.0
        rad = [math.radians(v) for v in a.angle[r_, slot]]
        cos = torch.tensor([math.cos(v) for v in rad], dtype=f32)[:, None, None]
        sin = torch.tensor([math.sin(v) for v in rad], dtype=f32)[:, None, None]
        t = lambda v: torch.from_numpy(np.asarray(v)).to(f32)[:, None, None]  # noqa: E731
        r = t(radius)
        px, py = X - t(cx), Y - t(cy)
        # Rotate by -angle into the object's frame (angle counter-clockwise on screen, y down).
        lx = (px * cos - py * sin) / r
        ly = (px * sin + py * cos) / r
        d_px = _SDF[name](lx, ly) * (r * size)
        cov[torch.from_numpy(sel)] = (0.5 - d_px).clamp(0.0, 1.0)
    return cov


_CHUNK = 1024


def _dilate3(m: Tensor) -> Tensor:
    """Grey-level dilation by a 3x3 square (max over each pixel's neighbours inside the image)."""
    p = F.pad(m, (1, 1, 1, 1), value=-math.inf)
    h = torch.maximum(torch.maximum(p[..., :, :-2], p[..., :, 1:-1]), p[..., :, 2:])
    return torch.maximum(torch.maximum(h[..., :-2, :], h[..., 1:-1, :]), h[..., 2:, :])


def _render_arrays(a: _Arrays, size: int, want_masks: bool) -> Rendering:
    n = len(a)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    masks = torch.empty(n, MAX_OBJECTS, size, size, dtype=f32) if want_masks else None
    edges = torch.empty(n, 1, size, size, dtype=f32) if want_masks else None
    colours = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=f32)
    for start in range(0, n, _CHUNK):
        rows = np.arange(start, min(start + _CHUNK, n))
        x = _background(a, rows, size)
        covs = [_coverage(a, rows, k, size) for k in range(MAX_OBJECTS)]
        for k, cov in enumerate(covs):
            col = colours[torch.from_numpy(a.colour[rows, k].clip(min=0))][:, :, None, None]
            c = cov[:, None]
            x = x * (1.0 - c) + col * c
        images[rows[0] : rows[-1] + 1] = torch.floor(x * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)
        if want_masks:
            visible = []
            for k in range(MAX_OBJECTS):
                m = covs[k]
                for j in range(k + 1, MAX_OBJECTS):
                    m = m * (1.0 - covs[j])
                visible.append(m)
            m = torch.stack(visible, 1)
            masks[rows[0] : rows[-1] + 1] = m
            grad = _dilate3(m) + _dilate3(-m)  # dilate(m) - erode(m)
            edges[rows[0] : rows[-1] + 1] = grad.amax(1, keepdim=True)
    return Rendering(images.to(f32) / 127.5 - 1.0, masks, edges)


def render(scenes: Sequence[Scene], size: int = 32, *, masks: bool = True) -> Rendering:
    r"""Render explicit scene records at ``size`` $\times$ ``size``: images, visible masks, edges.

    The same record always gives the bit-identical image, whatever else is rendered with it.
    """
    size = _check_size(size)
    if isinstance(scenes, Scene):
        scenes = [scenes]
    if len(scenes) == 0:
        raise ValueError("render needs at least one scene")
    return _render_arrays(_Arrays.from_scenes(scenes), size, masks)


def render_background(backgrounds: Background | Sequence[Background], size: int = 32) -> Tensor:
    r"""The backgrounds alone, ``[N, 3, size, size]`` in $[-1, 1]$, before 8-bit rounding: the
    $b$ of the compositing formula in the module docstring."""
    size = _check_size(size)
    if isinstance(backgrounds, Background):
        backgrounds = [backgrounds]
    if len(backgrounds) == 0 or not all(isinstance(b, Background) for b in backgrounds):
        raise ValueError("render_background needs one or more Background records")
    placeholder = (ShapeObject("circle", "red", "small", 0),)  # _background reads only the background
    a = _Arrays.from_scenes([Scene(placeholder, b) for b in backgrounds])
    return _background(a, np.arange(len(backgrounds)), size) * 2.0 - 1.0


# --- captions ---------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word in _ARTICLE_AN else "a"


def _location(cell: int) -> str:
    name = CELLS[cell]
    if name == "centre":
        return "in the centre"
    if name in ("left", "right"):
        return f"on the {name}"
    return f"at the {name}"


def _phrase(o: tuple[str, str, str, int], located: bool) -> str:
    shape, colour, size, cell = o
    text = f"{_article(size)} {size} {colour} {shape}"
    return f"{text} {_location(cell)}" if located else text


def _join(clauses: list[str]) -> str:
    if len(clauses) == 1:
        return clauses[0]
    return ", ".join(clauses[:-1]) + " and " + clauses[-1]


def caption(scene: Scene, style: str = "positional") -> str:
    r"""An English caption of ``scene``, naming its objects in drawing order.

    - ``"positional"``: every object with its size, colour, shape and location: "a small red
      circle at the top left", "a large blue square in the centre and a small green star on the
      right", "A, B and C".
    - ``"relational"``: two objects by their relation instead of their cells, "a small blue
      square left of a large green triangle" (see {func}`relation`); with three objects the
      third is located, "A left of B and C at the bottom"; one object as in ``"positional"``.
    - ``"shape"``: the shapes alone, "a circle", "a square and a star": a caption that asks
      exactly what a shape label does (chapter II.9 trains on it to tell the word's route from the
      label's).

    {func}`parse_caption` reads either back.
    """
    _check_choice("caption style", style, CAPTION_STYLES)
    if not isinstance(scene, Scene):
        raise ValueError(f"caption needs a Scene record; got {type(scene).__name__}")
    return _caption([(o.shape, o.colour, o.size, o.cell) for o in scene.objects], style)


def _caption(objs: list[tuple[str, str, str, int]], style: str) -> str:
    if style == "shape":
        return _join([f"{_article(o[0])} {o[0]}" for o in objs])
    if style == "positional" or len(objs) == 1:
        return _join([_phrase(o, True) for o in objs])
    pair = f"{_phrase(objs[0], False)} {relation(objs[0][3], objs[1][3])} {_phrase(objs[1], False)}"
    return pair if len(objs) == 2 else f"{pair} and {_phrase(objs[2], True)}"


@dataclass(frozen=True)
class CaptionObject:
    """One object as a caption states it: ``None`` for what the caption leaves open."""

    shape: str
    colour: str | None = None
    size: str | None = None
    cell: int | None = None


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for: objects in order, and relations ``(i, word, j)``: object i is
    ``word`` object j."""

    objects: tuple[CaptionObject, ...]
    relations: tuple[tuple[int, str, int], ...] = ()

    def satisfied_by(self, targets: Tensor) -> bool:
        r"""Whether a ``[9, 3]`` targets row (the scene as read back, e.g. by a classifier) shows
        exactly these objects: one object per requested object, every stated attribute, location
        and relation right, and no other object."""
        t = torch.as_tensor(targets)
        if t.shape != (9, 3):
            raise ValueError(f"targets must have shape [9, 3]; got {list(t.shape)}")
        occupied = [c for c in range(9) if int(t[c, 0]) != 0]
        if len(occupied) != len(self.objects):
            return False
        for cells in itertools.permutations(occupied):
            if all(_object_fits(o, t[c], c) for o, c in zip(self.objects, cells)) and all(
                relation(cells[i], cells[j]) == word for i, word, j in self.relations
            ):
                return True
        return False


def _object_fits(o: CaptionObject, row: Tensor, cell: int) -> bool:
    if o.cell is not None and o.cell != cell:
        return False
    wanted = (o.shape, o.colour, o.size)
    vocab = (SHAPES, COLOURS, SIZES)
    return all(w is None or int(row[h]) == 1 + vocab[h].index(w) for h, w in enumerate(wanted))


def _words(text: str) -> list[str]:
    """Lowercased words and commas (semicolons read as commas); other punctuation is dropped."""
    return [WORD_ALIASES.get(w, w) if w not in ",;" else "," for w in re.findall(r"[a-z]+|[,;]", text.lower())]


def parse_caption(text: str) -> CaptionSpec:
    """Read a caption of the grammar in this module's docstring into a {class}`CaptionSpec`.

    Case and punctuation are ignored. Raises ``ValueError`` naming the caption and the
    problem: an unknown word, a missing shape, an attribute given twice, two objects in one
    cell, or more than {data}`MAX_OBJECTS` objects.
    """
    if not isinstance(text, str):
        raise ValueError(f"a caption must be a string; got {type(text).__name__}")
    words = _words(text)
    if not any(w != "," for w in words):
        raise ValueError(f"caption {text!r} has no words")
    known = {*CAPTION_WORDS, ","}
    for w in words:
        if w not in known:
            raise ValueError(f"caption {text!r}: unknown word {w!r}")
    pos = 0
    objects: list[CaptionObject] = []
    relations: list[tuple[int, str, int]] = []

    def fail(why: str) -> ValueError:
        return ValueError(f"caption {text!r}: {why} (at word {pos + 1}, {' '.join(words[pos : pos + 3])!r})")

    def peek(k: int = 0) -> str | None:
        return words[pos + k] if pos + k < len(words) else None

    def skip_commas() -> None:
        nonlocal pos
        while peek() == ",":
            pos += 1

    def read_relation() -> str | None:
        nonlocal pos
        start = pos
        skip_commas()
        if peek() in ("left", "right") and peek(1) == "of":
            pos += 2
            return f"{words[pos - 2]} of"
        if peek() in ("above", "below"):
            pos += 1
            return words[pos - 1]
        pos = start
        return None

    def read_location() -> int | None:
        nonlocal pos
        if peek() not in ("at", "on", "in"):
            return None
        if peek(1) != "the":
            raise fail("expected 'the' after a location preposition")
        pos += 2
        first = peek()
        if first in ("top", "bottom"):
            pos += 1
            if peek() in ("left", "right") and peek(1) != "of":
                pos += 1
                return CELLS.index(f"{first} {words[pos - 1]}")
            return CELLS.index(first)
        if first in ("left", "right", "centre"):
            pos += 1
            return CELLS.index(first)
        raise fail("expected a cell (top, bottom, left, right, centre, or top/bottom left/right)")

    def read_object() -> CaptionObject:
        nonlocal pos
        if peek() not in ("a", "an"):
            raise fail("expected 'a' or 'an' to start an object")
        pos += 1
        found: dict[str, str] = {}
        while True:
            skip_commas()
            w = peek()
            if w is None:
                raise fail("expected a shape")
            kind = "size" if w in SIZES else "colour" if w in COLOURS else "shape" if w in SHAPES else None
            if kind is None:
                raise fail(f"expected a size, colour or shape, got {w!r}")
            if kind in found:
                raise fail(f"{kind} given twice ({found[kind]!r} and {w!r})")
            found[kind] = w
            pos += 1
            if kind == "shape":
                break
        return CaptionObject(found["shape"], found.get("colour"), found.get("size"), read_location())

    while True:
        objects.append(read_object())
        word = read_relation()
        if word is not None:
            objects.append(read_object())
            relations.append((len(objects) - 2, word, len(objects) - 1))
        if peek() not in (",", "and", None):
            raise fail("expected 'and', a comma, a relation, or the end")
        skip_commas()
        if peek() == "and":
            pos += 1
            if peek() is None:
                raise fail("expected an object after 'and'")
        if peek() is None:
            break
    if len(objects) > MAX_OBJECTS:
        raise ValueError(f"caption {text!r} names {len(objects)} objects; at most {MAX_OBJECTS}")
    cells = [o.cell for o in objects if o.cell is not None]
    if len(set(cells)) != len(cells):
        raise ValueError(f"caption {text!r} puts two objects in one cell")
    return CaptionSpec(tuple(objects), tuple(relations))


def _spec_cells(spec: CaptionSpec, u: float) -> tuple[int, ...]:
    """One cell assignment satisfying the spec's locations and relations, picked by ``u``."""
    fits = [
        cells
        for cells in itertools.permutations(range(9), len(spec.objects))
        if all(o.cell is None or o.cell == c for o, c in zip(spec.objects, cells))
        and all(relation(cells[i], cells[j]) == word for i, word, j in spec.relations)
    ]
    if not fits:
        raise ValueError("its locations and relations contradict each other")
    return fits[min(int(u * len(fits)), len(fits) - 1)]


def scene_from_caption(text: str, seed: int = 0, index: int = 0) -> Scene:
    r"""A scene that the caption describes: stated attributes, locations and relations as
    given; what it leaves open (sizes, colours, cells, jitter, background) drawn from
    ``(seed, index)`` as {func}`sample_scenes` would. Of the $F$ cell assignments that satisfy the
    caption's locations and relations (in the lexicographic order of the cell tuples), the one at
    $\min(\lfloor uF \rfloor, F - 1)$ is taken, with $u \in [0, 1)$ drawn from ``(seed, index)``; $F = 0$
    (a contradiction) is an error."""
    spec = parse_caption(text)
    seed = _check_seed(seed)
    index = _check_count("index", index, 0)
    k = len(spec.objects)
    a = _sample_arrays(seed, np.array([index]), (k, k))
    try:
        cells = _spec_cells(spec, float(_uniform(_keys(seed, np.array([index])), _S_SPEC_CELLS)[0]))
    except ValueError as err:
        raise ValueError(f"caption {text!r}: {err}") from None
    for slot, (o, c) in enumerate(zip(spec.objects, cells)):
        a.shape[0, slot] = SHAPES.index(o.shape)
        if o.colour is not None:
            a.colour[0, slot] = COLOURS.index(o.colour)
        if o.size is not None:
            a.size[0, slot] = SIZES.index(o.size)
        a.cell[0, slot] = c
    present = a.shape >= 0
    _keep_in_frame(
        {"shape": a.shape, "size": a.size, "cell": a.cell}, {"dx": a.dx, "dy": a.dy, "scale": a.scale}, present
    )
    return a.scene(0)


def locate_caption(text: str, seed: int = 0, index: int = 0) -> str:
    r"""The caption with a cell given to every object: a layout planner for layout-grounded models
    ({mod}`stepdiff.models.layout`), as LLM-grounded diffusion has a language model draw the boxes.

    The cells are those {func}`scene_from_caption` gives for the same ``(seed, index)``: of the $F$
    assignments of distinct cells that keep the caption's own locations and satisfy its relations,
    the one at $\min(\lfloor uF \rfloor, F - 1)$, $u \in [0, 1)$ drawn from ``(seed, index)`` (uniform
    over the assignments). The result is a positional caption
    ({func}`caption`) naming exactly the sizes and colours the caption names, so
    ``parse_caption(locate_caption(c))`` asks what ``c`` asks, and places everything; its cells
    satisfy ``c``'s relations. A contradiction (no such cells) is an error naming the caption."""
    spec = parse_caption(text)
    seed = _check_seed(seed)
    index = _check_count("index", index, 0)
    try:
        cells = _spec_cells(spec, float(_uniform(_keys(seed, np.array([index])), _S_SPEC_CELLS)[0]))
    except ValueError as err:
        raise ValueError(f"caption {text!r}: {err}") from None
    phrases = []
    for o, cell in zip(spec.objects, cells):
        words = [w for w in (o.size, o.colour, o.shape) if w is not None]
        phrases.append(f"{_article(words[0])} {' '.join(words)} {_location(cell)}")
    return _join(phrases)


def locate_captions(texts: Sequence[str], seed: int = 0) -> list[str]:
    r"""Every caption of ``texts`` planned by {func}`locate_caption`, caption $i$ from ``(seed, i)``:
    the prompts a layout-grounded model is given for a batch of images (one plan per image, so two
    images of the same prompt may place its objects differently)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of captions; got {type(texts).__name__} {texts!r}")
    return [locate_caption(text, seed, i) for i, text in enumerate(texts)]


# --- datasets ---------------------------------------------------------------------------------


@dataclass(eq=False)
class ShapesDataset:
    r"""A batch of shapes scenes and everything derived from them (see the module docstring).

    ``images [N, 3, H, W]`` float32 in $[-1, 1]$; ``labels [N]`` int64, the first object's
    shape index ({func}`class_label`); ``captions`` (list of str); ``scenes`` (a sequence of
    {class}`Scene` records, built when read); ``targets [N, 9, 3]`` int64 ({func}`scene_targets`);
    ``masks [N, 3, H, W]`` float32, object k's visible coverage (zero for absent objects);
    ``edges [N, 1, H, W]`` float32; ``classes`` the label names ({data}`SHAPES`). ``masks`` and ``edges`` are ``None``
    when the dataset was made with ``masks=False``.
    """

    images: Tensor
    labels: Tensor
    captions: list[str]
    scenes: Sequence[Scene]
    targets: Tensor
    masks: Tensor | None
    edges: Tensor | None
    classes: list[str] = field(default_factory=lambda: list(SHAPES))

    def __len__(self) -> int:
        return len(self.scenes)


def _dataset(a: _Arrays, scenes: Sequence[Scene], captions: list[str], size: int, masks: bool) -> ShapesDataset:
    images, m, e = _render_arrays(a, size, masks)
    labels = torch.from_numpy(a.shape[:, 0].copy())
    return ShapesDataset(images, labels, captions, scenes, a.targets(), m, e)


def sample_scenes(
    n: int, seed: int = 0, *, start: int = 0, n_objects: int | tuple[int, int] = (1, MAX_OBJECTS)
) -> list[Scene]:
    r"""The records of scenes ``start .. start + n - 1`` of ``seed`` (no rendering): scene $i$ is a
    function of $(\text{seed}, i)$ and ``n_objects`` alone (the module docstring's determinism), so
    ``sample_scenes(n, s, start=k)`` is a slice of any larger call."""
    n = _check_count("n", n, 1)
    start = _check_count("start", start, 0)
    a = _sample_arrays(_check_seed(seed), np.arange(start, start + n), _object_range(n_objects))
    return [a.scene(i) for i in range(n)]


def make_shapes(
    n: int,
    *,
    seed: int = 0,
    size: int = 32,
    n_objects: int | tuple[int, int] = (1, MAX_OBJECTS),
    start: int = 0,
    caption_style: str = "mixed",
    masks: bool = True,
) -> ShapesDataset:
    r"""``n`` seeded shapes scenes (indices ``start .. start + n - 1`` of ``seed``), rendered.

    ``n_objects``: an exact count (1, 2 or 3) or an inclusive range ``(lo, hi)``, uniform over
    the counts. ``caption_style``: ``"positional"``, ``"relational"``, ``"shape"`` (see
    {func}`caption`) or ``"mixed"``, each scene's style drawn from its own stream between the
    first two. ``masks=False`` skips the masks
    and edges (a 32x32 dataset then takes 12 KiB per image instead of 28 KiB).

    Scene $i$ depends only on $(\text{seed}, i)$ and ``n_objects``, so ``make_shapes(n, start=k)``
    is a slice of a larger call, and held-out data is another seed. Nothing is cached.
    """
    n = _check_count("n", n, 1)
    start = _check_count("start", start, 0)
    seed = _check_seed(seed)
    size = _check_size(size)
    if caption_style != "mixed":
        _check_choice("caption style", caption_style, CAPTION_STYLES)
    index = np.arange(start, start + n)
    a = _sample_arrays(seed, index, _object_range(n_objects))
    if caption_style == "mixed":
        relational = _uniform(_keys(seed, index), _S_STYLE) < 0.5
        styles = [("positional", "relational")[int(r)] for r in relational]
    else:
        styles = [caption_style] * n
    captions = [_caption(a.objects(i), st) for i, st in enumerate(styles)]
    return _dataset(a, _SceneList(a), captions, size, masks)


def shapes_from_scenes(
    scenes: Sequence[Scene], *, size: int = 32, caption_style: str = "positional", masks: bool = True
) -> ShapesDataset:
    r"""A dataset of explicit scene records, captioned in ``caption_style``, each rendered as in the
    module docstring: $x = \big(1 - \sum_k m_k\big)\,b + \sum_k m_k c_k$ with the visible masks $m_k$."""
    size = _check_size(size)
    _check_choice("caption style", caption_style, CAPTION_STYLES)
    scenes = list(scenes)
    if not scenes:
        raise ValueError("shapes_from_scenes needs at least one scene")
    a = _Arrays.from_scenes(scenes)
    return _dataset(a, scenes, [caption(s, caption_style) for s in scenes], size, masks)


def shapes_from_captions(texts: Sequence[str], *, seed: int = 0, size: int = 32, masks: bool = True) -> ShapesDataset:
    r"""Real images for prompts: scene $i$ is {func}`scene_from_caption` ``(texts[i], seed, i)``.

    ``captions`` are the given texts, so each row pairs a prompt with an image that satisfies it.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("shapes_from_captions needs at least one caption")
    scenes = [scene_from_caption(t, seed, i) for i, t in enumerate(texts)]
    return _dataset(_Arrays.from_scenes(scenes), scenes, texts, _check_size(size), masks)
