"""Tests for layout grounding: each located object's attribute words painted into its cell of the 3x3
grid (stepdiff.models.layout.LayoutRows), added to a UNet's first feature map (UNet(spatial=),
TextConditioned(layout=True), [model.text] layout), and the planner that gives every object of a
prompt a cell (stepdiff.shapes.locate_caption(s), used by stepdiff.runs.sample_images and TextToImage). Checked against
the captions' own parse, a map built pixel by pixel in float64 at odd sizes, the relations the
planner must keep, and errors that name the argument."""

from __future__ import annotations

import math

import pytest
import torch

from stepdiff.models.dit import DiT, DiTConfig
from stepdiff.models.layout import LayoutRows
from stepdiff.models.text import TextConditioned, TextEncoder
from stepdiff.models.unet import UNet, UNetConfig
from stepdiff.shapes import (
    COLOURS,
    SHAPES,
    SIZES,
    locate_caption,
    locate_captions,
    make_shapes,
    parse_caption,
    relation,
    scene_from_caption,
)
from stepdiff.text import Tokenizer

from .test_word_rows import wake

TOK = Tokenizer()


def captions(n, seed, style="mixed"):
    return make_shapes(n, seed=seed, n_objects=(1, 3), caption_style=style, masks=False).captions


@pytest.mark.parametrize("seed", [0, 1])
def test_cells_are_the_captions_locations(seed):
    """The cell read from the token ids is the cell the grammar's parser reads, for every located
    object of random 1-3-object captions of both styles; a relational pair ("left of") is unlocated,
    and slots past the caption's objects are empty."""
    texts = captions(200, seed)
    layout = LayoutRows(TOK.tokens, 4, TOK.pad_id)
    cells, located = layout.cells(TOK.encode(texts))
    unlocated = 0
    for i, text in enumerate(texts):
        spec = parse_caption(text)
        for k, o in enumerate(spec.objects):
            assert bool(located[i, k]) == (o.cell is not None), text
            if o.cell is not None:
                assert int(cells[i, k]) == o.cell, text
            unlocated += o.cell is None
        assert not located[i, len(spec.objects):].any(), text
    assert unlocated > 20  # the relational captions were exercised


def map_by_hand(text, R, height, width):
    """The layout map of one caption in float64, pixel by pixel: the parser's objects, each pixel's
    cell from its centre, floor(3 (i + 1/2) / n) per axis."""
    out = torch.zeros(R.shape[1], height, width, dtype=torch.float64)
    for o in parse_caption(text).objects:
        if o.cell is None:
            continue
        vec = sum(R[TOK.ids[w]] for w in (o.size, o.colour, o.shape) if w is not None)
        for y in range(height):
            for x in range(width):
                if math.floor(3 * (y + 0.5) / height) * 3 + math.floor(3 * (x + 0.5) / width) == o.cell:
                    out[:, y, x] += vec
    return out


@pytest.mark.parametrize("height,width", [(32, 32), (17, 9), (3, 5)])
def test_map_paints_each_objects_words_into_its_cell(height, width):
    torch.manual_seed(height * width)
    layout = LayoutRows(TOK.tokens, 5, TOK.pad_id)
    texts = [*captions(6, 7), "a circle left of a blue square", "a small red star",
             "a large green ring on the right and a heart at the bottom left"]
    got = layout(TOK.encode(texts), height, width)
    R = layout.rows.weight.detach().double()
    for i, text in enumerate(texts):
        torch.testing.assert_close(got[i].double(), map_by_hand(text, R, height, width), rtol=1e-6, atol=1e-5)
    assert got[len(texts) - 3].abs().sum() == 0  # a relational pair has no place


def test_padding_and_the_empty_caption():
    """Padding columns change nothing, and the empty caption (<bos> <eos>) has an all-zero map, so
    guidance's unconditional branch is given no layout."""
    layout = LayoutRows(TOK.tokens, 6, TOK.pad_id)
    ids = TOK.encode(captions(8, 3))
    padded = torch.cat([ids, torch.full((8, 5), TOK.pad_id)], 1)
    torch.testing.assert_close(layout(padded, 12, 12), layout(ids, 12, 12), rtol=0, atol=0)
    assert layout(TOK.empty(2), 12, 12).abs().sum() == 0


@pytest.mark.parametrize("seed", [0, 3])
def test_planner_places_every_object_and_keeps_what_was_asked(seed):
    """locate_caption keeps every stated attribute and location, places every object, satisfies the
    relations, agrees with scene_from_caption's cells, and is deterministic in (seed, index)."""
    texts = [*captions(40, seed, "relational"), "a blue square left of a green triangle", "a star",
             "a red circle above a square and a ring at the bottom"]
    for i, text in enumerate(texts):
        spec, planned = parse_caption(text), locate_caption(text, seed, i)
        got = parse_caption(planned)
        assert not got.relations and all(o.cell is not None for o in got.objects), planned
        cells = [o.cell for o in got.objects]
        assert len(set(cells)) == len(cells)
        for asked, placed in zip(spec.objects, got.objects, strict=True):
            assert (asked.shape, asked.colour, asked.size) == (placed.shape, placed.colour, placed.size)
            assert asked.cell in (None, placed.cell)
        assert all(relation(cells[a], cells[b]) == word for a, word, b in spec.relations), (text, planned)
        assert cells == [o.cell for o in scene_from_caption(text, seed, i).objects]
        assert locate_caption(text, seed, i) == planned
    placed = {parse_caption(locate_caption("a circle left of a square", seed, i)).objects[0].cell for i in range(60)}
    assert len(placed) >= 4  # the free places are drawn, not fixed


@pytest.mark.parametrize("seed", [0, 7])
def test_planning_a_batch_plans_caption_i_from_seed_and_i(seed):
    """locate_captions(texts, seed)[i] == locate_caption(texts[i], seed, i): two images of one prompt
    get their own plans; a bare string is refused rather than planned letter by letter."""
    texts = [*captions(9, seed, "mixed"), "a circle left of a square", "a circle left of a square"]
    planned = locate_captions(texts, seed)
    assert planned == [locate_caption(text, seed, i) for i, text in enumerate(texts)]
    with pytest.raises(TypeError, match="texts must be a list"):
        locate_captions("a red circle", seed)


def test_planner_errors_name_the_caption():
    with pytest.raises(ValueError, match="'a circle on the right left of a square on the left'.*contradict"):
        locate_caption("a circle on the right left of a square on the left")
    with pytest.raises(ValueError, match="unknown word 'dog'"):
        locate_caption("a dog")


def small_unet(context_dim=16):
    return UNet(UNetConfig(in_channels=3, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,),
                           heads=2, norm_groups=8, context_dim=context_dim))


def layout_model(layout=True, seed=0):
    torch.manual_seed(seed)
    encoder = TextEncoder(TOK.vocab_size, 16, 1, 2, TOK.max_len, pad_id=TOK.pad_id)
    return TextConditioned(small_unet(), encoder, TOK.pad_id, TOK.empty(1)[0], layout=layout, tokens=TOK.tokens)


def test_unet_adds_the_map_to_its_first_feature_map():
    """UNet(spatial=s) equals the UNet whose input convolution's bias map is shifted by s, and the
    text model passes its layout map there; the layout module is made last."""
    model = wake(layout_model())
    unet = model.denoiser
    ids = TOK.encode(["a small red circle at the top left and a large blue square in the centre",
                      "a green star on the right"])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.7])
    s = model.layout(ids, 16, 16)
    with torch.no_grad():
        got = model(x, t, ids)
        context, mask = model.encoder(model.captions(ids, 2, x.device))
        direct = unet(x, t, context=context, context_mask=mask, spatial=s)
        handle = unet.conv_in.register_forward_hook(lambda m, i, out: out + s)
        hooked = unet(x, t, context=context, context_mask=mask)
        handle.remove()
        plain = unet(x, t, context=context, context_mask=mask)
    torch.testing.assert_close(got, direct, rtol=0, atol=0)
    torch.testing.assert_close(direct, hooked, rtol=1e-5, atol=1e-6)
    assert (direct - plain).abs().max() > 1e-3  # the map matters
    plain_state, with_layout = layout_model(False).state_dict(), layout_model(True).state_dict()
    assert set(with_layout) - set(plain_state) == {"layout.rows.weight"}
    assert all(torch.equal(plain_state[k], with_layout[k]) for k in plain_state)


def test_gradients_reach_exactly_the_placed_words_rows():
    model = wake(layout_model())
    ids = TOK.encode(["a small red circle at the top left and a large blue square left of a star",
                      "a green ring at the bottom"])
    model(torch.randn(2, 3, 16, 16), torch.tensor([0.4, 0.6]), ids).pow(2).sum().backward()
    moved = {TOK.tokens[i] for i in model.layout.rows.weight.grad.abs().sum(1).nonzero().flatten().tolist()}
    # The second object of the first caption is unlocated ("left of"), so its words get no gradient
    # from the map; "star" likewise.
    assert moved == {"small", "red", "circle", "green", "ring"}
    assert moved <= {*SIZES, *COLOURS, *SHAPES}


def test_sampling_plans_the_prompts_of_a_layout_model():
    """stepdiff.runs.sample_images gives a layout model the planned captions (locate_caption with the
    sampling seed and the image's index), and a plain model the prompts as written."""
    from stepdiff.config import load_config, resolve, set_value
    from stepdiff.runs import sample_images

    cfg = resolve(set_value(set_value(load_config("shapes-pixel-t2i"), 'model.text.clip=""'),
                            "model.text.layout=true"))
    prompts = ["a blue square left of a green triangle", "a red circle", "a ring above a star"]
    for layout in (True, False):
        model, seen = layout_model(layout), []
        model.encoder.register_forward_hook(lambda m, i, out, seen=seen: seen.append(i[0].clone()))
        sample_images(model, cfg, 3, prompts=prompts, guidance=1.0, steps=1, seed=5)
        want = [locate_caption(p, 5, i) for i, p in enumerate(prompts)] if layout else prompts
        read = TOK.decode(seen[0])
        assert [parse_caption(r) for r in read] == [parse_caption(w) for w in want]


def test_errors_name_layout():
    from stepdiff.config import ConfigError, build_model, load_config, resolve, set_value
    from stepdiff.models.controlnet import controlnet_for

    encoder = TextEncoder(TOK.vocab_size, 16, 1, 2, TOK.max_len, pad_id=TOK.pad_id)
    dit = DiT(DiTConfig(hidden=16, depth=1, heads=2, context_dim=16))
    with pytest.raises(ValueError, match="layout .* needs a UNet"):
        TextConditioned(dit, encoder, TOK.pad_id, TOK.empty(1)[0], layout=True, tokens=TOK.tokens)
    with pytest.raises(ValueError, match="layout needs tokens"):
        TextConditioned(small_unet(), encoder, TOK.pad_id, TOK.empty(1)[0], layout=True)
    with pytest.raises(ValueError, match="layout must be True or False"):
        TextConditioned(small_unet(), encoder, TOK.pad_id, TOK.empty(1)[0], layout="yes", tokens=TOK.tokens)
    with pytest.raises(ValueError, match="tokens lacks the words"):
        LayoutRows(["<pad>", "a", "circle"], 4, 0)
    with pytest.raises(ValueError, match="channels must be a positive integer"):
        LayoutRows(TOK.tokens, 0, TOK.pad_id)
    with pytest.raises(ValueError, match="height must be an integer >= 3"):
        LayoutRows(TOK.tokens, 4, TOK.pad_id)(TOK.encode(["a circle"]), 2, 8)
    with pytest.raises(ValueError, match="ids must be token rows"):
        LayoutRows(TOK.tokens, 4, TOK.pad_id)(torch.zeros(3, dtype=torch.long), 8, 8)
    unet = small_unet()
    with pytest.raises(ValueError, match=r"spatial must be a float tensor \[2, 16, 8, 8\]"):
        unet(torch.randn(2, 3, 8, 8), 0.5, context=torch.randn(2, 3, 16), spatial=torch.zeros(2, 8, 8, 8))
    with pytest.raises(ValueError, match="layout map"):
        controlnet_for(layout_model())

    def config(*assignments):
        raw = load_config("shapes-pixel-t2i")
        for a in assignments:
            raw = set_value(raw, a)
        return resolve(raw)

    model = build_model(config("model.text.layout=true"))
    assert model.layout.rows.weight.shape == (TOK.vocab_size, model.denoiser.config.channels)
    assert build_model(config()).layout is None
    for bad in (('model.arch="dit"', 'model.text.clip=""'), ('data.condition="class"', 'model.text.clip=""')):
        with pytest.raises(ConfigError, match=r"\[model.text\] layout"):
            config("model.text.layout=true", *bad)


def test_pipeline_plans_each_image_of_a_layout_model():
    """TextToImage gives a layout model each image's planned caption (seed, image index), and a plain
    model its prompts as written."""
    from stepdiff.pipelines import TextToImage

    prompts = ["a blue square left of a green triangle", "a ring above a star"]
    for layout in (True, False):
        model, seen = layout_model(layout), []
        model.encoder.register_forward_hook(lambda m, i, out, seen=seen: seen.append(i[0].clone()))
        TextToImage(model, image_size=16)(prompts, num_images_per_prompt=2, guidance_scale=1.0, steps=1, seed=4)
        each = [p for p in prompts for _ in range(2)]
        want = [locate_caption(p, 4, j) for j, p in enumerate(each)] if layout else each
        assert [parse_caption(r) for r in TOK.decode(seen[0])] == [parse_caption(w) for w in want]
