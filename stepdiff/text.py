r"""A word-level tokenizer over the shapes captions' grammar ({mod}`stepdiff.shapes`).

The vocabulary is fixed: four special tokens, then every word the caption grammar can write
({data}`stepdiff.shapes.CAPTION_WORDS`), in that order, so token ids never change between runs:

| id | token | meaning |
|---|---|---|
| 0 | `<pad>` | right padding; masked out (`Tokenizer.mask`) |
| 1 | `<unk>` | any word outside the vocabulary |
| 2 | `<bos>` | begins every row, so no row is all padding |
| 3 | `<eos>` | ends every row |
| 4, ... | words | `a`, `an`, sizes, colours, shapes, location and relation words, `and` |

A prompt is lowercased and split into runs of letters and digits (punctuation and hyphens
separate words and are dropped); {data}`stepdiff.shapes.WORD_ALIASES` maps a few spellings
("center") to grammar words. ``encode`` gives ``[<bos>, w_1, ..., w_n, <eos>, <pad>, ...]``.
The "no caption" row of classifier-free guidance and of text dropout in training is
``[<bos>, <eos>]`` ({meth}`Tokenizer.empty`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from .shapes import CAPTION_WORDS, MAX_CAPTION_WORDS, WORD_ALIASES

__all__ = ["Tokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


class Tokenizer:
    """Caption words to token ids and back; see the module docstring for the vocabulary."""

    pad_id = 0
    unk_id = 1
    bos_id = 2
    eos_id = 3

    def __init__(self) -> None:
        self.tokens: tuple[str, ...] = SPECIAL_TOKENS + tuple(CAPTION_WORDS)
        self.ids: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        # The longest row the grammar produces: its words plus <bos> and <eos>.
        self.max_len: int = MAX_CAPTION_WORDS + 2

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def article_ids(self) -> tuple[int, ...]:
        """The ids of "a" and "an": each object of a caption opens with one (see {mod}`stepdiff.shapes`)."""
        return tuple(self.ids[w] for w in ("a", "an") if w in self.ids)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, max_len={self.max_len})"

    @staticmethod
    def words(text: str) -> list[str]:
        """The prompt's words: lowercased runs of letters and digits, aliases resolved."""
        if not isinstance(text, str):
            raise ValueError(f"a prompt must be a string; got {type(text).__name__} {text!r}")
        return [WORD_ALIASES.get(w, w) for w in re.findall(r"[a-z0-9]+", text.lower())]

    def _row(self, text: str) -> list[int]:
        ids = [self.ids.get(w, self.unk_id) for w in self.words(text)]
        if not any(i != self.unk_id for i in ids):
            what = "is empty" if not ids else "has no known word"
            raise ValueError(f"prompt {text!r} {what}; known words: {', '.join(CAPTION_WORDS)}")
        return [self.bos_id, *ids, self.eos_id]

    def encode(self, texts: str | Sequence[str], max_len: int | None = None) -> Tensor:
        r"""``LongTensor [B, L]``: each prompt as ``<bos>`` words ``<eos>``, right-padded with
        ``pad_id`` to ``L`` = ``max_len``, or to the longest row when ``max_len`` is ``None``.

        Unknown words become ``unk_id``. Raises ``ValueError`` naming the prompt when it is
        empty or has no known word, or when it does not fit in ``max_len``.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("encode needs at least one prompt")
        rows = [self._row(t) for t in texts]
        longest = max(len(r) for r in rows)
        if max_len is None:
            max_len = longest
        elif isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an integer >= 2 (room for <bos> and <eos>); got {max_len!r}")
        for text, row in zip(texts, rows):
            if len(row) > max_len:
                raise ValueError(f"prompt {text!r} needs {len(row)} tokens, more than max_len={max_len}")
        out = torch.full((len(rows), max_len), self.pad_id, dtype=torch.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        return out

    def mask(self, ids: Tensor) -> Tensor:
        """``BoolTensor`` shaped like ``ids``: ``True`` for a real token, ``False`` for padding."""
        ids = torch.as_tensor(ids)
        if ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise ValueError(f"token ids must be integers; got dtype {ids.dtype}")
        return ids != self.pad_id

    def empty(self, batch: int, length: int | None = None) -> Tensor:
        """``LongTensor [batch, length]`` of "no caption" rows ``<bos> <eos> <pad> ...``
        (``length`` defaults to 2; pass the conditional rows' length to batch them together)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer; got {batch!r}")
        length = 2 if length is None else length
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise ValueError(f"length must be an integer >= 2; got {length!r}")
        out = torch.full((batch, length), self.pad_id, dtype=torch.int64)
        out[:, 0], out[:, 1] = self.bos_id, self.eos_id
        return out

    def decode(self, ids: Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Token ids back to text: a ``[L]`` row to a string, ``[B, L]`` to a list of strings.

        ``<pad>``, ``<bos>`` and ``<eos>`` are dropped; an unknown word reads ``<unk>``.
        """
        t = torch.as_tensor(ids)
        if t.dim() not in (1, 2):
            raise ValueError(f"decode takes ids of shape [L] or [B, L]; got {list(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1}; got {int(t.min())}..{int(t.max())}")
        skip = {self.pad_id, self.bos_id, self.eos_id}
        rows = [" ".join(self.tokens[i] for i in row.tolist() if i not in skip) for row in t.reshape(-1, t.shape[-1])]
        return rows[0] if t.dim() == 1 else rows
