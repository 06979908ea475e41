"""T5's SentencePiece tokenizer from a local folder (``spiece.model``), equal to transformers' ``T5Tokenizer``.

    tok = T5Tokenizer.from_folder("/ckpt/t5-base")             # reads /ckpt/t5-base/spiece.model
    ids_BL, mask_BL = tok(["open the drawer"], max_length=32)  # int32 numpy; ids end with </s> (1), pad 0
    ids_BL, mask_BL = tok.tokenize(["open the drawer"])        # same call, padded to the longest text
    ids_L, mask_L = tok.encode_padded("open the drawer", 32)   # one text (data-pipeline transforms)

Ids: SentencePiece pieces, then ``</s>``; padding with ``<pad>`` (0) on the right; the 100 sentinel tokens
``<extra_id_0..99>`` take the ids just after the SentencePiece vocabulary in reverse order, as transformers
(``<extra_id_0>`` = vocab size + 99), and are recognised in the text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

_SPECIAL = re.compile(r"(<extra_id_\d+>|</s>|<pad>|<unk>)")


class T5Tokenizer:
    """``tokenizer(texts, max_length=None) -> (input_ids[B, L], attention_mask[B, L])``."""

    def __init__(self, path: str, extra_ids: int = 100):
        """``path``: a folder holding ``spiece.model`` or the ``.model`` file itself."""
        import sentencepiece

        model_file = os.path.join(path, "spiece.model") if os.path.isdir(path) else path
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"{model_file} not found: a T5 tokenizer folder needs spiece.model")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        n = self.sp.get_piece_size()
        self.special = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.special |= {f"<extra_id_{i}>": n + extra_ids - 1 - i for i in range(extra_ids)}
        self.pad_token_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.eos_token_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 1
        self.vocab_size = n + extra_ids

    @classmethod
    def from_folder(cls, path: str, extra_ids: int = 100) -> "T5Tokenizer":
        return cls(os.path.join(path, "spiece.model"), extra_ids)

    def encode(self, text: str) -> list[int]:
        """Ids of one text, with the trailing ``</s>``."""
        ids = []
        for part in _SPECIAL.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part.strip():
                ids.extend(self.sp.encode(part))
        return ids + [self.eos_token_id]

    def encode_padded(self, text: str, max_length: int):
        """One text -> (ids[max_length], mask[max_length]) int32 (a per-sample data-pipeline transform)."""
        ids, mask = self([text], max_length=max_length)
        return ids[0], mask[0]

    def lengths(self, texts: Sequence[str]) -> list[int]:
        return [len(self.encode(t)) for t in texts]

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None):
        """Pads to ``max_length`` (default: the longest text); longer texts are cut, keeping ``</s>``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        seqs = [self.encode(t) for t in texts]
        length = max_length if max_length is not None else max(len(s) for s in seqs)
        ids = np.full((len(seqs), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(seqs), length), np.int32)
        for row, s in enumerate(seqs):
            if len(s) > length:
                s = s[:length - 1] + [self.eos_token_id]
            ids[row, :len(s)] = s
            mask[row, :len(s)] = 1
        return ids, mask

    tokenize = __call__
