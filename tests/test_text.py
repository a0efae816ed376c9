"""Tests for stepdiff.text: the tokenizer over the shapes caption grammar."""

import pytest
import torch

from stepdiff import shapes as S
from stepdiff.text import SPECIAL_TOKENS, Tokenizer

tok = Tokenizer()


def test_vocabulary_is_the_specials_then_the_grammar_words():
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.tokens[:4] == SPECIAL_TOKENS
    assert tok.tokens[4:] == S.CAPTION_WORDS and len(set(tok.tokens)) == tok.vocab_size
    assert tok.vocab_size == 4 + len(S.CAPTION_WORDS)
    assert Tokenizer().tokens == tok.tokens  # fixed: the same ids in every instance


def test_every_caption_encodes_without_unknown_words():
    scenes = S.sample_scenes(2000, seed=2)
    captions = [S.caption(s, style) for s in scenes for style in S.CAPTION_STYLES]
    ids = tok.encode(captions)
    assert ids.shape == (len(captions), ids.shape[1]) and ids.dtype == torch.int64
    assert not bool((ids == tok.unk_id).any())
    assert ids.shape[1] <= tok.max_len
    # Each row reads <bos> words <eos> <pad>..., and decodes back to the caption (commas aside).
    assert torch.all(ids[:, 0] == tok.bos_id)
    lengths = tok.mask(ids).sum(1)
    assert torch.all(ids[torch.arange(len(ids)), lengths - 1] == tok.eos_id)
    assert tok.decode(ids) == [c.replace(",", "") for c in captions]
    # Every grammar word occurs in some caption ("an" only in prompts: sizes come first).
    used = {w for c in captions for w in tok.words(c)}
    assert used == set(S.CAPTION_WORDS) - {"an"}


def test_max_len_is_the_longest_caption():
    corners = [S.ShapeObject("circle", "red", "small", c) for c in ("top left", "top right", "bottom right")]
    longest = S.caption(S.Scene(tuple(corners)))
    assert len(tok.words(longest)) == S.MAX_CAPTION_WORDS
    assert tok.encode(longest).shape == (1, tok.max_len)
    assert tok.encode([longest, "a circle"], max_len=tok.max_len).shape == (2, tok.max_len)


def test_padding_is_on_the_right_and_masked():
    ids = tok.encode(["a red circle", "a small blue square at the top left"], max_len=12)
    assert ids.shape == (2, 12)
    mask = tok.mask(ids)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [5, 10]
    assert torch.all(mask[:, :-1] >= mask[:, 1:])  # a prefix of Trues
    assert torch.all(ids[~mask] == tok.pad_id)
    assert tok.encode("a red circle").shape == (1, 5)  # a single prompt, no padding
    with pytest.raises(ValueError, match="'a small blue square at the top left' needs 10 tokens"):
        tok.encode(["a small blue square at the top left"], max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode("a red circle", max_len=1)


def test_case_punctuation_and_aliases_are_tolerated():
    want = tok.encode("a small red circle at the top left")
    assert torch.equal(tok.encode("A Small RED circle, at the TOP-left!"), want)
    assert torch.equal(tok.encode("  a small red circle at the top left.  "), want)
    assert torch.equal(tok.encode("a ring in the center"), tok.encode("a ring in the centre"))


def test_unknown_words_map_to_unk():
    ids = tok.encode("a purple dragon at the top")[0]
    words = ["a", "purple", None, "at", "the", "top"]
    assert ids.tolist() == [tok.bos_id] + [tok.ids[w] if w else tok.unk_id for w in words] + [tok.eos_id]
    assert tok.decode(ids) == "a purple <unk> at the top"


@pytest.mark.parametrize("prompt", ["", "   ", "!!!", "zebra crossing", "3 dogs"])
def test_a_prompt_without_known_words_is_refused(prompt):
    with pytest.raises(ValueError, match="prompt") as err:
        tok.encode(["a red circle", prompt])
    assert repr(prompt) in str(err.value)


def test_empty_rows_for_the_unconditional_branch():
    e = tok.empty(3)
    assert e.shape == (3, 2) and torch.all(e == torch.tensor([tok.bos_id, tok.eos_id]))
    e = tok.empty(2, length=6)
    assert e.shape == (2, 6) and tok.mask(e).sum(1).tolist() == [2, 2] and tok.decode(e) == ["", ""]
    # Batched with conditional rows of the same length, as guidance does.
    cond = tok.encode(["a red circle", "a blue ring"])
    both = torch.cat([cond, tok.empty(2, cond.shape[1])])
    assert both.shape == (4, cond.shape[1])
    with pytest.raises(ValueError, match="batch"):
        tok.empty(0)
    with pytest.raises(ValueError, match="length"):
        tok.empty(2, length=1)


def test_decode_and_mask_errors():
    assert tok.decode([2, tok.ids["a"], tok.ids["star"], 3, 0]) == "a star"
    with pytest.raises(ValueError, match="token ids must lie"):
        tok.decode([2, tok.vocab_size])
    with pytest.raises(ValueError, match="shape"):
        tok.decode(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        tok.mask(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="string"):
        tok.encode([None])
