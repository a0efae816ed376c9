"""Tests for stepdiff.models.clip: the symmetric contrastive loss against a hand-computed case and
a float64 reference, retrieval accuracy on planted embeddings, the towers (shapes, padding,
pooling), CLIPScore, errors, and a short training run on "shapes" pairs that lifts held-out
retrieval far above chance."""

from __future__ import annotations

import math

import pytest
import torch

from stepdiff.models.clip import CLIP, CLIPConfig, clip_loss, clip_score, contrastive_loss, retrieval_accuracy
from stepdiff.shapes import make_shapes
from stepdiff.text import Tokenizer
from stepdiff.train import train

TOK = Tokenizer()


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread avoids the workers' synchronisation on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed: int = 0, **kw) -> CLIP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIP(CLIPConfig.preset("tiny", **kw))


# --- the loss ---------------------------------------------------------------------------------


def test_contrastive_loss_hand_computed_2x2():
    # logits [[2, 0], [1, 3]]: rows (image -> text) and columns (text -> image), diagonal right.
    # row 0: -log(e^2 / (e^2 + e^0)) = log(1 + e^-2);  row 1: -log(e^3 / (e^1 + e^3)) = log(1 + e^-2)
    # col 0: -log(e^2 / (e^2 + e^1)) = log(1 + e^-1);  col 1: -log(e^3 / (e^0 + e^3)) = log(1 + e^-3)
    rows = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-2))) / 2
    cols = (math.log1p(math.exp(-1)) + math.log1p(math.exp(-3))) / 2
    want = (rows + cols) / 2  # = 0.15392...
    got = contrastive_loss(torch.tensor([[2.0, 0.0], [1.0, 3.0]], dtype=torch.float64))
    assert abs(float(got) - want) < 1e-6
    assert abs(want - 0.153926) < 1e-6


def test_contrastive_loss_hand_computed_3x3_uniform_rows():
    # Every logit equal: each cross-entropy is log 3, whatever the scale.
    assert abs(float(contrastive_loss(torch.full((3, 3), 7.0))) - math.log(3)) < 1e-6
    # A perfect diagonal of margin m: each term is log(1 + 2 e^-m).
    m = 4.0
    logits = m * torch.eye(3)
    assert abs(float(contrastive_loss(logits)) - math.log1p(2 * math.exp(-m))) < 1e-6


def test_contrastive_loss_symmetric_and_against_reference():
    g = torch.Generator().manual_seed(0)
    for B in (1, 5, 17):
        logits = torch.randn(B, B, generator=g, dtype=torch.float64) * 3
        ref_rows = -torch.diagonal(logits.log_softmax(1)).mean()
        ref_cols = -torch.diagonal(logits.log_softmax(0)).mean()
        got = contrastive_loss(logits)
        assert abs(float(got) - float((ref_rows + ref_cols) / 2)) < 1e-5
        # Symmetric: swapping images and texts changes nothing.
        assert abs(float(contrastive_loss(logits.T)) - float(got)) < 1e-6
        # Relabelling the pairs (the same permutation of rows and columns) changes nothing.
        p = torch.randperm(B, generator=g)
        assert abs(float(contrastive_loss(logits[p][:, p])) - float(got)) < 1e-5
    # The loss of one pair is 0 (nothing to contrast with).
    assert float(contrastive_loss(torch.tensor([[3.0]]))) == 0.0


def test_contrastive_loss_errors():
    for bad in (torch.zeros(2, 3), torch.zeros(4), torch.zeros(0, 0), "logits"):
        with pytest.raises(ValueError, match="logits"):
            contrastive_loss(bad)


def test_model_logits_are_scaled_cosines_and_the_scale_is_capped():
    model = tiny()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    ids = TOK.encode(["a red circle", "a small blue square at the top", "a large green star", "a white ring"])
    logits = model(x, ids)
    u, v = model.encode_image(x), model.encode_text(ids)
    assert torch.allclose(u.norm(dim=1), torch.ones(4), atol=1e-5) and torch.allclose(v.norm(dim=1), torch.ones(4))
    assert torch.allclose(logits, (1 / 0.07) * u @ v.T, atol=1e-4)
    assert torch.allclose(model.loss(x, ids), contrastive_loss(logits))
    assert torch.allclose(clip_loss(model, x, ids, None), contrastive_loss(logits))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # e^10 > 100: capped
    assert abs(float(model.scale.detach()) - 100.0) < 1e-3


# --- retrieval on planted embeddings ----------------------------------------------------------


def planted(n: int, s: list[int], t: list[int], a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One group of n pairs in R^n: image i = e_i, text i = e_i, except texts j in s point at
    image a (text j = e_a + 0.1 e_j: a text->image miss) and images k in t point at text b
    (image k = e_b + 0.1 e_k: an image->text miss)."""
    eye = torch.eye(n, dtype=torch.float64)
    img, txt = eye.clone(), eye.clone()
    for j in s:
        txt[j] = eye[a] + 0.1 * eye[j]
    for k in t:
        img[k] = eye[b] + 0.1 * eye[k]
    return img, txt


def test_retrieval_accuracy_planted_100_way():
    g = torch.Generator().manual_seed(1)
    imgs, txts, want_t2i, want_i2t = [], [], [], []
    for group in range(3):
        perm = torch.randperm(100, generator=g).tolist()
        a, b = perm[0], perm[1]
        s, t = perm[2 : 2 + 7 * (group + 1)], perm[40 : 40 + 3 * group]
        img, txt = planted(100, s, t, a, b)
        imgs.append(img)
        txts.append(txt)
        want_t2i.append(1 - len(s) / 100)
        want_i2t.append(1 - len(t) / 100)
    # A random rotation and positive rescaling keep every cosine.
    q, _ = torch.linalg.qr(torch.randn(100, 100, generator=g, dtype=torch.float64))
    scale = torch.rand(300, 1, generator=g, dtype=torch.float64) + 0.5
    img = (torch.cat(imgs) @ q) * scale
    txt = (torch.cat(txts) @ q) * scale.flip(0)
    r = retrieval_accuracy(img.float(), txt.float(), n_way=100)
    assert r["n_way"] == 100 and r["groups"] == 3 and r["chance"] == 0.01
    assert abs(r["text_to_image"] - sum(want_t2i) / 3) < 1e-12
    assert abs(r["image_to_text"] - sum(want_i2t) / 3) < 1e-12
    # One group of 300: the groups' one-hots collide across groups (the same e_i in each), so
    # the score drops; the direction-specific misses of the 100-way run are still misses.
    whole = retrieval_accuracy(img.float(), txt.float())
    assert whole["n_way"] == 300 and whole["text_to_image"] < r["text_to_image"]


def test_retrieval_accuracy_same_keys_forgive_duplicates():
    # Texts 0 and 1 are the same caption: text 1 retrieving image 0 is right under `same`.
    img = torch.eye(4)
    txt = torch.eye(4)
    txt[1] = img[0] + 0.1 * img[1]
    plain = retrieval_accuracy(img, txt)
    assert plain["text_to_image"] == 0.75 and plain["image_to_text"] == 1.0
    keyed = retrieval_accuracy(img, txt, same=["a red circle", "a red circle", "a blue ring", "a star"])
    assert keyed["text_to_image"] == 1.0
    assert retrieval_accuracy(img, txt, same=torch.tensor([5, 5, 6, 7]))["text_to_image"] == 1.0


def test_retrieval_accuracy_errors():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="n_way"):
        retrieval_accuracy(x, x, n_way=3)
    with pytest.raises(ValueError, match="n_way"):
        retrieval_accuracy(x, x, n_way=1)
    with pytest.raises(ValueError, match="same shape"):
        retrieval_accuracy(x, x[:8])
    with pytest.raises(ValueError, match="image_features"):
        retrieval_accuracy(torch.zeros(10, 4, dtype=torch.long), x)
    with pytest.raises(ValueError, match="same"):
        retrieval_accuracy(x, x, same=[1, 2])


# --- towers, pooling, CLIPScore ---------------------------------------------------------------


def test_towers_shapes_and_padding_invariance():
    model = tiny(2).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert model.encode_image(x).shape == (3, 16)
    texts = ["a red circle", "a large blue square at the bottom left and a small star", "a ring"]
    ids = TOK.encode(texts)
    longer = TOK.encode(texts, max_len=TOK.max_len)  # more padding on the right
    assert torch.allclose(model.encode_text(ids), model.encode_text(longer), atol=1e-6)
    # Each row alone gives the same embedding as in the batch.
    for i, text in enumerate(texts):
        assert torch.allclose(model.encode_text(TOK.encode(text))[0], model.encode_text(ids)[i], atol=1e-6)
    # The per-token context is the text encoder's (what a denoiser attends to).
    ctx, mask = model.text.tokens(ids)
    assert ctx.shape == (3, ids.shape[1], 16) and torch.equal(mask, ids != TOK.pad_id)
    assert model.text_encoder is model.text.encoder


def test_eos_pooling_reads_the_last_real_token_and_mean_pooling_the_real_tokens():
    torch.manual_seed(0)
    model = tiny(3)
    ids = TOK.encode(["a red circle", "a large blue square at the top"])
    h, mask = model.text.tokens(ids)
    lengths = mask.sum(1)
    eos = torch.stack([h[b, int(lengths[b]) - 1] for b in range(2)])
    assert torch.allclose(model.text(ids), model.text.proj(eos), atol=1e-6)
    assert (ids[torch.arange(2), lengths - 1] == TOK.eos_id).all()
    mean_model = tiny(3, pool="mean")
    h, mask = mean_model.text.tokens(ids)
    mean = torch.stack([h[b, : int(lengths[b])].mean(0) for b in range(2)])
    assert torch.allclose(mean_model.text(ids), mean_model.text.proj(mean), atol=1e-6)


def test_clip_score_is_hundred_times_the_clamped_cosine():
    model = tiny(4)
    x = torch.rand(7, 3, 16, 16) * 2 - 1
    ids = TOK.encode([f"a {c} circle" for c in ("red", "blue", "green", "white", "cyan", "purple", "orange")])
    s = clip_score(model, x, ids, batch_size=3)
    cos = (model.encode_image(x) * model.encode_text(ids)).sum(1)
    assert s.shape == (7,) and torch.allclose(s, 100 * cos.clamp(min=0).detach(), atol=1e-4)
    assert (s >= 0).all() and (s <= 100).all()
    assert model.training  # restored
    with pytest.raises(ValueError, match="same number of pairs"):
        clip_score(model, x, ids[:3])


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="image_size"):
        CLIPConfig(image_size=20)
    with pytest.raises(ValueError, match="pool"):
        CLIPConfig(pool="max")
    with pytest.raises(ValueError, match="norm_groups"):
        CLIPConfig(widths=(12, 16))
    with pytest.raises(ValueError, match="init_temperature"):
        CLIPConfig(init_temperature=0.001)
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        CLIPConfig.preset("huge")
    with pytest.raises(TypeError, match="unknown CLIPConfig fields"):
        CLIPConfig.preset("tiny", depth=3)
    model = tiny()
    with pytest.raises(ValueError, match="images must be a float batch"):
        model.encode_image(torch.zeros(2, 3, 32, 32))  # the tiny test model is 16x16
    with pytest.raises(ValueError, match="same size"):
        model(torch.zeros(2, 3, 16, 16), TOK.encode(["a red circle"]))
    with pytest.raises(ValueError, match="ids"):
        model.encode_text(torch.zeros(2, 3))  # float ids
    with pytest.raises(ValueError, match="captions"):
        clip_loss(model, torch.zeros(2, 3, 16, 16), None)


def test_defaults_follow_the_tokenizer():
    c = CLIPConfig()
    assert (c.vocab_size, c.max_len, c.pad_id) == (TOK.vocab_size, TOK.max_len, TOK.pad_id)


# --- training ---------------------------------------------------------------------------------


def test_short_training_on_shapes_lifts_retrieval_far_above_chance():
    """300 steps of the tiny CLIP on 16x16 single-object scenes, through stepdiff.train.train with
    the contrastive loss as its loss_fn: held-out 20-way retrieval (chance 5 %) passes 60 % both ways."""
    data = make_shapes(1000, seed=0, size=16, n_objects=1, masks=False)
    held = make_shapes(200, seed=1, size=16, n_objects=1, masks=False)
    model = tiny(0)

    def accuracy(m: CLIP) -> dict:
        m.eval()
        with torch.no_grad():
            r = retrieval_accuracy(m.encode_image(held.images), m.encode_text(TOK.encode(held.captions)),
                                   n_way=20, same=held.captions)
        m.train()
        return r

    before = accuracy(model)
    result = train(model, data.images, loss_fn=clip_loss, labels=TOK.encode(data.captions), steps=300,
                   batch_size=32, lr=3e-3, grad_clip=None, seed=0)
    after = accuracy(result.model)
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert before["text_to_image"] < 0.25 and before["image_to_text"] < 0.25
    assert after["text_to_image"] > 0.6 and after["image_to_text"] > 0.6, after


class _Wrapped(torch.nn.Module):
    """Stands in for DistributedDataParallel: it exposes forward and .module only."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_clip_loss_goes_through_forward_so_a_ddp_wrapper_works():
    model = tiny(5)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    ids = TOK.encode(["a red circle", "a blue ring", "a small star"])
    assert torch.equal(clip_loss(_Wrapped(model), x, ids), clip_loss(model, x, ids))
