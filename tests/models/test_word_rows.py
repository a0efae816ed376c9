"""Tests for the word rows: a free N(0, 1) row per word, summed over a caption and added to a UNet's
time embedding (stepdiff.models.text.WordRows, TextConditioned(word_rows=True), UNet(embedding=),
[model.text] word_rows). Checked against the sum of rows by hand in float64, against the UNet called
with that embedding, for the weights a seed draws, for gradients that reach exactly the used rows,
and for errors that name the argument."""

from __future__ import annotations

import pytest
import torch

from stepdiff.models.dit import DiT, DiTConfig
from stepdiff.models.text import TextConditioned, TextEncoder, WordRows
from stepdiff.models.unet import UNet, UNetConfig

VOCAB, PAD, BOS, EOS = 23, 0, 2, 3
NULL = torch.tensor([BOS, EOS])


def rows(B, L, seed):
    """Random right-padded token rows [B, L] framed by BOS and EOS, each with 1..L-2 words."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((B, L), PAD)
    for b in range(B):
        n = int(torch.randint(1, L - 1, (1,), generator=g))
        ids[b, : n + 2] = torch.cat([torch.tensor([BOS]), torch.randint(4, VOCAB, (n,), generator=g),
                                     torch.tensor([EOS])])
    return ids


def text_unet(word_rows, seed=0):
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(in_channels=3, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,),
                           heads=2, norm_groups=8, context_dim=16))
    encoder = TextEncoder(VOCAB, 16, 1, 2, 12, pad_id=PAD)
    return TextConditioned(unet, encoder, PAD, NULL, word_rows=word_rows)


def wake(module, std=0.1):
    """Draw the zero-initialised weights (output and residual convolutions), so every path of the
    UNet reaches its output and a check that a path matters can fail."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0, std)
    return module


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_word_rows_sum_the_real_tokens_rows(seed):
    """b = sum over real tokens of R[id], in float64 by hand; padding adds nothing; R starts N(0, 1)."""
    torch.manual_seed(seed)
    bag = WordRows(VOCAB, 37, PAD)
    ids = rows(5, 11, seed)
    R = bag.rows.weight.detach().double()
    want = torch.stack([R[[i for i in row.tolist() if i != PAD]].sum(0) for row in ids])
    torch.testing.assert_close(bag(ids).double(), want, rtol=1e-6, atol=1e-6)
    longer = torch.cat([ids, torch.full((5, 4), PAD)], 1)
    torch.testing.assert_close(bag(longer), bag(ids), rtol=1e-6, atol=1e-6)  # the sum's order may differ
    big = WordRows(500, 400, PAD).rows.weight.detach()
    assert abs(float(big.std()) - 1) < 0.01 and abs(float(big.mean())) < 0.01


def test_only_the_used_rows_get_gradients():
    bag = WordRows(VOCAB, 8, PAD)
    ids = torch.tensor([[BOS, 5, 9, EOS, PAD], [BOS, 5, EOS, PAD, PAD]])
    bag(ids).pow(2).sum().backward()
    touched = (bag.rows.weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert touched == [BOS, EOS, 5, 9]


def test_the_model_adds_the_bag_to_the_unets_time_embedding():
    """TextConditioned(word_rows=True)(x, t, y) equals the UNet called with the encoder's context and
    embedding = the bag of y's words; uncaptioned rows get the null caption's bag."""
    model = text_unet(True).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    y = rows(3, 7, 5)
    y[1] = PAD  # uncaptioned: the null caption's words
    wake(model.denoiser)
    with torch.no_grad():
        ids = model.captions(y, 3, x.device)
        c, m = model.encoder(ids)
        want = model.denoiser(x, t, context=c, context_mask=m, embedding=model.word_rows(ids))
        got = model(x, t, y)
        assert torch.equal(got, want)
        assert torch.equal(ids[1, :2], NULL)
        without = model.denoiser(x, t, context=c, context_mask=m)
        assert (got - without).abs().max() > 1e-3  # the bag changes the output


def test_embedding_zero_is_no_embedding_and_a_bad_one_is_named():
    torch.manual_seed(3)
    unet = UNet(UNetConfig(in_channels=1, channels=8, channel_mult=(1,), num_res_blocks=1, attn_levels=(),
                           norm_groups=4, n_classes=0))
    wake(unet)
    x, t = torch.randn(2, 1, 5, 7), torch.rand(2)
    assert unet.embed_dim == 32
    assert torch.equal(unet(x, t, embedding=torch.zeros(2, 32)), unet(x, t))
    for bad in (torch.zeros(2, 31), torch.zeros(3, 32), torch.zeros(2, 32, dtype=torch.long), [0.0] * 32):
        with pytest.raises(ValueError, match="embedding must be a float tensor"):
            unet(x, t, embedding=bad)


def test_word_rows_are_made_last():
    """The other weights are those the seed draws without word rows."""
    plain, with_rows = text_unet(False).state_dict(), text_unet(True).state_dict()
    assert set(with_rows) - set(plain) == {"word_rows.rows.weight"}
    assert all(torch.equal(plain[k], with_rows[k]) for k in plain)


def test_word_rows_learn_a_word():
    """Adam on the word rows alone (every other weight frozen) lowers the error of a model asked to
    draw +1 for one caption and -1 for another."""
    model = wake(text_unet(True))
    for p in model.parameters():
        p.requires_grad_(False)
    model.word_rows.rows.weight.requires_grad_(True)
    opt = torch.optim.Adam([model.word_rows.rows.weight], lr=0.05)
    y = torch.tensor([[BOS, 5, EOS], [BOS, 6, EOS]])
    x, t = torch.zeros(2, 3, 8, 8), torch.full((2,), 0.5)
    target = torch.stack([torch.ones(3, 8, 8), -torch.ones(3, 8, 8)])
    losses = []
    for _ in range(40):
        loss = (model(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_errors_name_word_rows():
    torch.manual_seed(0)
    dit = DiT(DiTConfig(hidden=16, depth=1, heads=2, context_dim=16))
    encoder = TextEncoder(VOCAB, 16, 1, 2, 12, pad_id=PAD)
    with pytest.raises(ValueError, match="word_rows .* needs a UNet"):
        TextConditioned(dit, encoder, PAD, NULL, word_rows=True)
    with pytest.raises(ValueError, match="word_rows must be True or False"):
        TextConditioned(text_unet(False).denoiser, encoder, PAD, NULL, word_rows=1)
    with pytest.raises(ValueError, match="pad_id"):
        WordRows(VOCAB, 8, VOCAB)
    with pytest.raises(ValueError, match="ids must be token rows"):
        WordRows(VOCAB, 8, PAD)(torch.zeros(3, dtype=torch.long))
    from stepdiff.models.controlnet import controlnet_for

    with pytest.raises(ValueError, match="word_rows"):
        controlnet_for(text_unet(True))


def test_word_rows_configuration():
    """``[model.text] word_rows = true`` builds a model with a row per caption word, beside a frozen
    CLIP tower or a scratch encoder; on a DiT or a class-conditioned model it is an error naming it."""
    from stepdiff.config import ConfigError, build_model, load_config, resolve, set_value
    from stepdiff.text import Tokenizer

    def config(*assignments):
        raw = load_config("shapes-pixel-t2i")
        for a in assignments:
            raw = set_value(raw, a)
        return resolve(raw)

    tok = Tokenizer()
    for extra in ((), ('model.text.clip=""',)):
        model = build_model(config("model.text.word_rows=true", *extra))
        assert model.word_rows.rows.weight.shape == (tok.vocab_size, model.denoiser.embed_dim)
        assert model.word_rows.rows.weight.requires_grad
    assert build_model(config()).word_rows is None
    for bad in (('model.arch="dit"', 'model.text.clip=""'), ('data.condition="class"', 'model.text.clip=""')):
        with pytest.raises(ConfigError, match=r"\[model.text\] word_rows"):
            config("model.text.word_rows=true", *bad)
    with pytest.raises(ConfigError, match="word_rows"):
        config("model.text.word_rows=2")


A, AN = 4, 5  # the articles that open an object in these tests' token rows


def object_rows_by_hand(ids, R, vocab, objects):
    """sum_i R[k_i * V + id_i] in float64, with k_i counted by walking each row: the number of
    articles seen so far, minus one, kept in 0..objects-1."""
    out = []
    for row in ids.tolist():
        seen, total = 0, torch.zeros(R.shape[1], dtype=torch.float64)
        for i in row:
            seen += i in (A, AN)
            if i != PAD:
                total += R[min(max(seen - 1, 0), objects - 1) * vocab + i]
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("objects", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_object_rows_take_each_objects_words_from_its_own_table(objects, seed):
    """With K tables, the k-th article's words use table k (a fourth object shares the last table),
    checked against a walk over each row in float64, on random rows with random articles."""
    torch.manual_seed(seed)
    bag = WordRows(VOCAB, 19, PAD, objects=objects, start_ids=(A, AN))
    assert bag.rows.weight.shape == (objects * VOCAB, 19)
    ids = rows(7, 15, seed)
    want = object_rows_by_hand(ids, bag.rows.weight.detach().double(), VOCAB, objects)
    torch.testing.assert_close(bag(ids).double(), want, rtol=1e-6, atol=1e-6)
    assert int((ids == A).sum() + (ids == AN).sum()) > 0  # the draw holds articles, so tables are chosen


def test_object_rows_keep_who_has_which_colour():
    """A plain bag gives "a red circle left of a blue square" and "a blue circle left of a red
    square" the same vector; rows per object tell them apart, and one object's words alone agree."""
    from stepdiff.text import Tokenizer

    tok = Tokenizer()
    ids = tok.encode(["a red circle left of a blue square", "a blue circle left of a red square",
                      "a red circle at the top left"])
    torch.manual_seed(0)
    plain = WordRows(tok.vocab_size, 32, tok.pad_id)
    torch.manual_seed(0)
    split = WordRows(tok.vocab_size, 32, tok.pad_id, objects=2, start_ids=tok.article_ids)
    p, s = plain(ids), split(ids)
    torch.testing.assert_close(p[0], p[1])
    assert float((s[0] - s[1]).detach().norm()) > 1.0
    # The first table is the plain bag's draw, so a one-object caption gets the same vector.
    torch.testing.assert_close(s[2], p[2])
    assert torch.equal(split.object_index(ids[:1])[0, :8], torch.tensor([0, 0, 0, 0, 0, 0, 1, 1]))


def test_object_rows_errors_name_the_argument():
    with pytest.raises(ValueError, match="start_ids"):
        WordRows(VOCAB, 8, PAD, objects=2)
    with pytest.raises(ValueError, match="start_ids"):
        WordRows(VOCAB, 8, PAD, objects=2, start_ids=(PAD,))
    with pytest.raises(ValueError, match="objects"):
        WordRows(VOCAB, 8, PAD, objects=0, start_ids=(A,))
    with pytest.raises(ValueError, match="word_row_objects .* needs word_rows=True"):
        TextConditioned(text_unet(False).denoiser, TextEncoder(VOCAB, 16, 1, 2, 12, pad_id=PAD), PAD, NULL,
                        word_row_objects=2, object_start_ids=(A,))


def test_object_rows_configuration():
    """``[model.text] word_row_objects = 2`` gives two tables opened by the tokenizer's articles;
    without word_rows, or below 1, it is an error naming the key."""
    from stepdiff.config import ConfigError, build_model, load_config, resolve, set_value
    from stepdiff.text import Tokenizer

    def config(*assignments):
        raw = load_config("shapes-pixel-t2i")
        for a in assignments:
            raw = set_value(raw, a)
        return resolve(raw)

    tok = Tokenizer()
    model = build_model(config("model.text.word_rows=true", "model.text.word_row_objects=2"))
    assert model.word_rows.rows.weight.shape == (2 * tok.vocab_size, model.denoiser.embed_dim)
    assert model.word_rows.start_ids.tolist() == [tok.ids["a"], tok.ids["an"]]
    for bad in (("model.text.word_row_objects=2",), ("model.text.word_rows=true", "model.text.word_row_objects=0")):
        with pytest.raises(ConfigError, match=r"\[model.text\] word_row_objects"):
            config(*bad)
