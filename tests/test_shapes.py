"""Tests for stepdiff.shapes: determinism, masks and edges against the rendering, captions parsed
back to the records, targets, the number of attribute combinations, and clear errors."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import threads_kept

from stepdiff import shapes as S


@pytest.fixture(scope="module")
def ds():
    return S.make_shapes(160, seed=7)


def _rgb(colour: str) -> torch.Tensor:
    return torch.tensor(S.COLOUR_RGB[colour]) * 2 - 1  # in [-1, 1]


# --- vocabularies and fields ------------------------------------------------------------------


def test_vocabularies():
    assert {"circle", "square", "triangle", "cross"} <= set(S.SHAPES) and len(S.SHAPES) >= 6
    assert len(S.COLOURS) >= 6 and set(S.COLOUR_RGB) == set(S.COLOURS)
    rgb = torch.tensor([S.COLOUR_RGB[c] for c in S.COLOURS])
    gaps = torch.cdist(rgb, rgb) + 10 * torch.eye(len(S.COLOURS))
    assert float(gaps.min()) > 0.3  # clearly distinct colours (RGB in [0, 1])
    assert len(S.SIZES) >= 2 and len(S.CELLS) == 9 and S.CELLS[0] == "top left" and S.CELLS[4] == "centre"
    assert all(len(v) == len(set(v)) for v in (S.SHAPES, S.COLOURS, S.SIZES, S.CELLS))


def test_dataset_fields(ds):
    n = len(ds)
    assert n == 160 and len(ds.captions) == n and len(ds.scenes) == n
    assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.float32
    assert float(ds.images.min()) >= -1 and float(ds.images.max()) <= 1
    u = (ds.images.double() + 1) * 127.5  # 8-bit values u / 127.5 - 1 (to float32 rounding)
    assert float((u - u.round()).abs().max()) < 1e-4
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert ds.targets.shape == (n, 9, 3) and ds.targets.dtype == torch.int64
    assert ds.masks.shape == (n, 3, 32, 32) and ds.edges.shape == (n, 1, 32, 32)
    assert ds.classes == list(S.SHAPES)
    counts = torch.tensor([len(s.objects) for s in ds.scenes])
    assert set(counts.tolist()) == {1, 2, 3}
    # The class label is the first object's shape.
    assert ds.labels.tolist() == [S.SHAPES.index(s.objects[0].shape) for s in ds.scenes]
    assert ds.labels.tolist() == [S.class_label(s) for s in ds.scenes]
    # scenes behaves as a sequence.
    assert ds.scenes[-1] == ds.scenes[n - 1] and ds.scenes[3:5] == [ds.scenes[3], ds.scenes[4]]
    with pytest.raises(IndexError):
        ds.scenes[n]


def test_targets_agree_with_the_scenes(ds):
    assert torch.equal(ds.targets, S.scene_targets(list(ds.scenes)))
    for i, scene in enumerate(ds.scenes):
        t = ds.targets[i]
        assert int((t[:, 0] > 0).sum()) == len(scene.objects)
        assert torch.all((t == 0).all(1) | (t > 0).all(1))  # a cell is empty or fully named
        for o in scene.objects:
            assert S.SHAPES[t[o.cell, 0] - 1] == o.shape
            assert S.COLOURS[t[o.cell, 1] - 1] == o.colour
            assert S.SIZES[t[o.cell, 2] - 1] == o.size


def test_sampler_obeys_the_placement_rules_and_reaches_every_value():
    scenes = S.sample_scenes(3000, seed=3)
    seen = {k: set() for k in ("shape", "colour", "size", "cell")}
    kinds = set()
    for s in scenes:
        cells = [o.cell for o in s.objects]
        assert len(set(cells)) == len(cells) and 1 <= len(cells) <= 3
        for o in s.objects:
            for k in seen:
                seen[k].add(getattr(o, k))
            # Offsets stay within the jitter, except that an object at the border is pushed
            # inwards just enough to keep it (the disc that holds it at any angle) in frame.
            for d, pos in ((o.dx, o.cell % 3), (o.dy, o.cell // 3)):
                centre = (pos + 0.5 + d) / 3
                reach = S._EXTENT[o.shape] * S.SIZE_RADIUS[o.size] * o.scale / 3
                assert reach < centre < 1 - reach
                assert abs(d) <= S.JITTER_OFFSET or (abs(d) < 0.25 and (d > 0) == (pos == 0) and pos != 1)
            assert abs(o.scale - 1) <= S.JITTER_SCALE and abs(o.angle) <= S.JITTER_ANGLE
        kinds.add(s.background.kind)
    assert seen == {"shape": set(S.SHAPES), "colour": set(S.COLOURS), "size": set(S.SIZES), "cell": set(range(9))}
    assert kinds == set(S.BACKGROUNDS)
    for k in (1, 2, 3):
        assert all(len(s.objects) == k for s in S.sample_scenes(50, seed=3, n_objects=k))
    assert {len(s.objects) for s in S.sample_scenes(200, seed=3, n_objects=(2, 3))} == {2, 3}


def test_at_least_a_million_attribute_combinations():
    # Count from the vocabularies and the placement rule (k objects in k distinct cells of 9).
    per_object = len(S.SHAPES) * len(S.COLOURS) * len(S.SIZES)
    ordered = sum(sum(1 for _ in itertools.permutations(range(9), k)) * per_object**k for k in (1, 2, 3))
    unordered = sum(sum(1 for _ in itertools.combinations(range(9), k)) * per_object**k for k in (1, 2, 3))
    assert S.count_combinations((1, 3)) == ordered
    assert S.count_combinations((1, 3), ordered=False) == unordered
    assert unordered >= 1_000_000  # distinct targets alone (drawing order and jitter not counted)
    assert S.count_combinations(1) == 9 * per_object
    assert S.count_combinations(3, ordered=False) >= 1_000_000


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_same_images_bit_for_bit(ds):
    again = S.make_shapes(160, seed=7)
    assert torch.equal(ds.images, again.images) and torch.equal(ds.masks, again.masks)
    assert torch.equal(ds.edges, again.edges) and ds.captions == again.captions
    assert list(ds.scenes) == list(again.scenes)
    other = S.make_shapes(160, seed=8)
    assert not torch.equal(ds.images, other.images)
    assert (ds.images != other.images).flatten(1).any(1).float().mean() > 0.99  # nearly every image differs


def test_a_scene_does_not_depend_on_its_batch(ds, monkeypatch):
    part = S.make_shapes(37, seed=7, start=101)
    assert torch.equal(part.images, ds.images[101:138]) and torch.equal(part.masks, ds.masks[101:138])
    assert part.captions == ds.captions[101:138] and torch.equal(part.targets, ds.targets[101:138])
    single = S.make_shapes(1, seed=7, start=150)
    assert torch.equal(single.images[0], ds.images[150])
    # Chunking inside the renderer and the number of threads change nothing either.
    monkeypatch.setattr(S, "_CHUNK", 13)
    with threads_kept(1):
        chunked = S.make_shapes(160, seed=7)
    assert torch.equal(chunked.images, ds.images) and torch.equal(chunked.edges, ds.edges)


def test_rendering_a_record_reproduces_the_dataset_image(ds):
    idx = [5, 17, 120, 159]
    r = S.render([ds.scenes[i] for i in idx])
    assert torch.equal(r.images, ds.images[idx]) and torch.equal(r.masks, ds.masks[idx])
    assert torch.equal(r.edges, ds.edges[idx])
    again = S.shapes_from_scenes([ds.scenes[i] for i in idx], masks=False)
    assert torch.equal(again.images, ds.images[idx]) and again.masks is None and again.edges is None


def test_other_sizes_render_the_same_scenes():
    small, large = S.make_shapes(20, seed=1, size=16), S.make_shapes(20, seed=1, size=64)
    base = S.make_shapes(20, seed=1)
    assert small.images.shape == (20, 3, 16, 16) and large.images.shape == (20, 3, 64, 64)
    assert torch.equal(small.targets, base.targets) and torch.equal(large.targets, base.targets)
    # Downsampled, the 64x64 images match the 32x32 ones up to anti-aliasing.
    assert float((F.avg_pool2d(large.images, 2) - base.images).abs().mean()) < 0.03


# --- masks, colours, edges --------------------------------------------------------------------


def test_masks_match_the_rendering(ds):
    m, x = ds.masks, ds.images
    assert float(m.min()) >= 0 and float(m.max()) <= 1
    total = m.sum(1)
    assert float(total.max()) <= 1 + 1e-6  # visible coverages of a pixel add up to at most 1
    b = S.render_background([s.background for s in ds.scenes])
    colours = torch.zeros(len(ds), 3, 3)  # [N, object, rgb], zero for absent objects
    for i, scene in enumerate(ds.scenes):
        assert torch.all(m[i, len(scene.objects) :] == 0)  # absent objects cover nothing
        for j, o in enumerate(scene.objects):
            colours[i, j] = _rgb(o.colour)
    # x = (1 - sum_k m_k) b + sum_k m_k c_k, then rounded to 8 bits (error <= 1/255).
    composed = (1 - total[:, None]) * b + torch.einsum("nkc,nkhw->nchw", colours, m)
    assert float((composed - x).abs().max()) <= 1 / 255 + 1e-5
    # Where an object covers a pixel fully its colour is the pixel; where none covers it, the
    # background is.
    for i, scene in enumerate(ds.scenes):
        for j in range(len(scene.objects)):
            full = m[i, j] > 0.999
            assert int(full.sum()) > 0  # every object stays visible
            assert float((x[i][:, full] - colours[i, j][:, None]).abs().max()) <= 2 / 255 + 1e-5
    empty = (total == 0)[:, None].expand_as(x)
    assert float((x[empty] - b[empty]).abs().max()) <= 1 / 255 + 1e-6


def test_coverage_is_the_shape_area():
    # A lone object's coverage integrates to its analytic area (anti-aliasing conserves area).
    cell_px = 96 / 3
    for shape, area in (
        ("circle", math.pi * 0.88**2),
        ("square", (2 * 0.74) ** 2),
        ("ring", math.pi * 4 * 0.68 * 0.24),
    ):
        for size in S.SIZES:
            scene = S.Scene((S.ShapeObject(shape, "red", size, "centre", angle=10.0),))
            r_px = S.SIZE_RADIUS[size] * cell_px
            got = float(S.render(scene, size=96).masks[0, 0].sum())
            assert abs(got / (area * r_px**2) - 1) < 0.01, (shape, size, got)


def test_overlap_later_objects_cover_earlier_ones():
    a = S.ShapeObject("square", "red", "large", "left", dx=0.4)
    b = S.ShapeObject("circle", "blue", "large", "centre", dx=-0.4)
    r = S.render(S.Scene((a, b)), size=48)
    alone_a = S.render(S.Scene((a,)), size=48).masks[0, 0]
    alone_b = S.render(S.Scene((b,)), size=48).masks[0, 0]
    overlap = (alone_a > 0.999) & (alone_b > 0.999)
    assert int(overlap.sum()) > 5
    assert torch.all(r.masks[0, 0][overlap] == 0) and torch.all(r.masks[0, 1][overlap] == 1)
    assert torch.allclose(r.masks[0, 0], alone_a * (1 - alone_b)) and torch.equal(r.masks[0, 1], alone_b)
    assert float(r.masks[0].sum(0).max()) <= 1 + 1e-6


def test_objects_stand_out_from_every_background():
    scenes = S.sample_scenes(400, seed=11)
    bg = (S.render_background([s.background for s in scenes]) + 1) / 2  # [N, 3, H, W] in [0, 1]
    pixels = bg.permute(0, 2, 3, 1).reshape(-1, 3)
    rgb = torch.tensor([S.COLOUR_RGB[c] for c in S.COLOURS])
    assert float(torch.cdist(rgb, pixels).min()) > 0.3
    assert {s.background.kind for s in scenes} == set(S.BACKGROUNDS)


def test_edges_are_the_morphological_gradient_of_the_masks(ds):
    m = ds.masks.reshape(-1, 1, 32, 32)
    ref = (F.max_pool2d(m, 3, 1, 1) + F.max_pool2d(-m, 3, 1, 1)).reshape(-1, 3, 32, 32).amax(1, keepdim=True)
    assert torch.allclose(ds.edges, ref, atol=1e-6)
    # So edges sit on mask boundaries: zero where every mask is constant over the 3x3
    # neighbourhood (background, object interiors), and strong where a mask steps from 0 to 1.
    lo, hi = -F.max_pool2d(-ds.masks, 3, 1, 1), F.max_pool2d(ds.masks, 3, 1, 1)
    flat = (hi - lo).amax(1, keepdim=True) == 0
    assert torch.all(ds.edges[flat] == 0)
    step = ((hi > 0.999) & (lo < 0.001)).any(1, keepdim=True)
    assert torch.all(ds.edges[step] > 0.999)
    assert float(ds.edges.min()) >= 0 and float(ds.edges.max()) <= 1


# --- captions ---------------------------------------------------------------------------------


def test_caption_examples():
    tl = S.ShapeObject("circle", "red", "small", "top left")
    assert S.caption(S.Scene((tl,))) == "a small red circle at the top left"
    sq = S.ShapeObject("square", "blue", "small", 3)
    tri = S.ShapeObject("triangle", "green", "large", 5)
    assert S.caption(S.Scene((sq, tri)), "relational") == "a small blue square left of a large green triangle"
    assert S.caption(S.Scene((sq, tri))) == "a small blue square on the left and a large green triangle on the right"
    ring = S.ShapeObject("ring", "orange", "large", "centre")
    assert S.caption(S.Scene((tl, ring, tri))) == (
        "a small red circle at the top left, a large orange ring in the centre and a large green triangle on the right"
    )
    assert S.caption(S.Scene((ring, tl, sq)), "relational") == (
        "a large orange ring right of a small red circle and a small blue square on the left"
    )
    assert S.caption(S.Scene((S.ShapeObject("star", "orange", "small", 7),))) == "a small orange star at the bottom"


def test_relation_from_cells():
    assert S.relation("top left", "top right") == "left of" and S.relation("right", "left") == "right of"
    assert S.relation("top", "bottom") == "above" and S.relation("bottom", "centre") == "below"
    assert S.relation("top left", "bottom right") == "left of"  # a diagonal reads horizontally
    assert S.relation("top", "bottom left") == "above"  # two rows beat one column
    for a, b in itertools.permutations(range(9), 2):  # A rel B and B rel' A are mirror images
        mirror = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        assert S.relation(b, a) == mirror[S.relation(a, b)]
    with pytest.raises(ValueError, match="share a cell"):
        S.relation(4, "centre")


@pytest.mark.parametrize("style", S.CAPTION_STYLES)
def test_captions_parse_back_to_the_records(style):
    scenes = S.sample_scenes(1500, seed=5)
    targets = S.scene_targets(scenes)
    for scene, t in zip(scenes, targets):
        text = S.caption(scene, style)
        spec = S.parse_caption(text)
        objs = scene.objects
        if style == "shape":  # the shapes alone: nothing else asked, so any colour, size and place holds
            assert spec.objects == tuple(S.CaptionObject(o.shape) for o in objs) and not spec.relations
            assert spec.satisfied_by(t), text
            wrong = t.clone()
            c = objs[-1].cell
            wrong[c, 0] = wrong[c, 0] % len(S.SHAPES) + 1
            assert not spec.satisfied_by(wrong)
            continue
        assert [(o.shape, o.colour, o.size) for o in spec.objects] == [(o.shape, o.colour, o.size) for o in objs]
        located = style == "positional" or len(objs) == 1
        for k, (got, want) in enumerate(zip(spec.objects, objs)):
            if located or k == 2:
                assert got.cell == want.cell, text
            else:
                assert got.cell is None
        expected_relations = () if located else ((0, S.relation(objs[0].cell, objs[1].cell), 1),)
        assert spec.relations == expected_relations
        assert spec.satisfied_by(t), text
        # Change one object's colour in the targets: the caption no longer holds.
        wrong = t.clone()
        c = objs[-1].cell
        wrong[c, 1] = wrong[c, 1] % len(S.COLOURS) + 1
        assert not spec.satisfied_by(wrong)


def test_dataset_captions_mix_both_styles(ds):
    relational = [c for c in ds.captions if any(f" {w} a" in c for w in ("left of", "right of", "above", "below"))]
    assert 0.2 < len(relational) / len(ds) < 0.5  # half the 2- and 3-object captions
    for text, t in zip(ds.captions, ds.targets):
        assert S.parse_caption(text).satisfied_by(t)
    pos = S.make_shapes(30, seed=7, caption_style="positional")
    assert pos.captions == [S.caption(s) for s in ds.scenes[:30]]
    bare = S.make_shapes(30, seed=7, caption_style="shape")
    assert bare.captions == [S.caption(s, "shape") for s in ds.scenes[:30]]
    assert torch.equal(bare.images, pos.images)  # the style changes the words, never the scenes


def test_parser_reads_prompts_in_the_grammar():
    spec = S.parse_caption("A blue square, left of a green triangle.")
    assert spec.objects == (S.CaptionObject("square", "blue"), S.CaptionObject("triangle", "green"))
    assert spec.relations == ((0, "left of", 1),)
    spec = S.parse_caption("an orange star in the center")
    assert spec.objects == (S.CaptionObject("star", "orange", None, 4),)
    spec = S.parse_caption("a red circle at the top left and a cross at the bottom")
    assert [o.cell for o in spec.objects] == [0, 7] and spec.objects[1].colour is None
    # "top left of" is the cell "top" and then a relation.
    spec = S.parse_caption("a red circle at the top left of a blue ring")
    assert spec.objects[0].cell == 1 and spec.relations == ((0, "left of", 1),)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no words"),
        ("a red hexagon", "unknown word 'hexagon'"),
        ("red circle", "expected 'a' or 'an'"),
        ("a red", "expected a shape"),
        ("a small large circle", "size given twice"),
        ("a red circle at top", "expected 'the'"),
        ("a red circle at the of", "expected a cell"),
        ("a red circle a blue square", "expected 'and'"),
        ("a red circle and", "expected an object after 'and'"),
        ("a circle and a square and a star and a ring", "at most 3"),
        ("a circle at the top and a square at the top", "two objects in one cell"),
    ],
)
def test_parser_errors_name_the_caption(text, message):
    with pytest.raises(ValueError, match=message) as err:
        S.parse_caption(text)
    assert repr(text) in str(err.value) or text == ""


def test_scenes_from_captions_satisfy_them():
    prompts = [
        "a small red circle at the top left",
        "a blue square left of a green triangle",
        "a large white star above a small cyan heart",
        "a ring below a cross and a small purple diamond at the bottom right",
        "a yellow square",
    ]
    for seed in range(5):
        ds = S.shapes_from_captions(prompts, seed=seed)
        assert ds.captions == prompts and ds.images.shape == (5, 3, 32, 32)
        for text, t in zip(prompts, ds.targets):
            assert S.parse_caption(text).satisfied_by(t), (seed, text)
    # The prompt's colour is where its mask is.
    ds = S.shapes_from_captions(prompts[:1])
    full = ds.masks[0, 0] > 0.999
    assert float((ds.images[0][:, full] - _rgb("red")[:, None]).abs().max()) < 0.01
    ys, xs = torch.nonzero(full, as_tuple=True)
    assert float(ys.float().mean()) < 32 / 3 and float(xs.float().mean()) < 32 / 3  # top left cell
    # Deterministic in (seed, index), different across seeds.
    a, b = S.scene_from_caption(prompts[1], seed=3), S.scene_from_caption(prompts[1], seed=3)
    assert a == b and a != S.scene_from_caption(prompts[1], seed=4)
    with pytest.raises(ValueError, match="contradict"):
        S.scene_from_caption("a red circle on the left right of a blue square on the right")


# --- errors -----------------------------------------------------------------------------------


def test_records_reject_unknown_names_and_bad_values():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        S.ShapeObject("hexagon", "red", "small", 0)
    with pytest.raises(ValueError, match="unknown colour 'magenta'"):
        S.ShapeObject("circle", "magenta", "small", 0)
    with pytest.raises(ValueError, match="unknown size 'medium'"):
        S.ShapeObject("circle", "red", "medium", 0)
    with pytest.raises(ValueError, match="unknown cell 'upper left'"):
        S.ShapeObject("circle", "red", "small", "upper left")
    with pytest.raises(ValueError, match="cell must be an index"):
        S.ShapeObject("circle", "red", "small", 9)
    with pytest.raises(ValueError, match="dx"):
        S.ShapeObject("circle", "red", "small", 0, dx=0.7)
    with pytest.raises(ValueError, match="1 to 3 objects"):
        S.Scene(())
    obj = S.ShapeObject("circle", "red", "small", 0)
    with pytest.raises(ValueError, match="1 to 3 objects"):
        S.Scene(tuple(S.ShapeObject("circle", "red", "small", c) for c in range(4)))
    with pytest.raises(ValueError, match="one object per cell"):
        S.Scene((obj, S.ShapeObject("square", "blue", "large", "top left")))
    with pytest.raises(ValueError, match="background kind"):
        S.Background("checkers")
    with pytest.raises(ValueError, match="background colour"):
        S.Background("plain", (1.2, 0.0, 0.0))
    with pytest.raises(ValueError, match="caption style"):
        S.caption(S.Scene((obj,)), "poetic")


def test_generators_reject_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        S.make_shapes(0)
    with pytest.raises(ValueError, match="n must be"):
        S.sample_scenes(-3)
    with pytest.raises(ValueError, match="size"):
        S.make_shapes(4, size=4)
    with pytest.raises(ValueError, match="size"):
        S.make_shapes(4, size=32.0)
    with pytest.raises(ValueError, match="n_objects"):
        S.make_shapes(4, n_objects=0)
    with pytest.raises(ValueError, match="n_objects"):
        S.make_shapes(4, n_objects=4)
    with pytest.raises(ValueError, match="n_objects"):
        S.make_shapes(4, n_objects=(3, 1))
    with pytest.raises(ValueError, match="seed"):
        S.make_shapes(4, seed=-1)
    with pytest.raises(ValueError, match="caption style"):
        S.make_shapes(4, caption_style="short")
    with pytest.raises(ValueError, match="at least one scene"):
        S.render([])
    with pytest.raises(ValueError, match="Scene records"):
        S.render(["a red circle"])
    with pytest.raises(ValueError, match="shape"):
        S.CaptionSpec((S.CaptionObject("circle"),)).satisfied_by(torch.zeros(9, 2, dtype=torch.long))
