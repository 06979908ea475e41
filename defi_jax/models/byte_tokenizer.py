"""The byte-level tokenizers of configs that ship no vocabulary (tiny configs, tests): two fixed schemes.

    ids, mask = clip_bytes("Open the drawer", max_length=20)   # the CLIP text towers (GFDM, policy goal)
    ids, mask = gidm_bytes("open the drawer", max_length=32)   # the GIDM's byte embedding

Both return ``(input_ids int32[max_length], attention_mask int32[max_length])``. The ids are part of every
checkpoint trained with them: neither scheme may change.

``clip_bytes``  CLIP-like: lower-cased, whitespace collapsed, UTF-8 byte ``b`` -> ``b + 3``, ``bos = 1``,
                ``eos = pad = 2`` (CLIP pads with its end-of-text token too); a long text keeps its eos as
                the last token (``CLIPTokenizer``'s truncation). Needs a text tower with ``vocab_size >=``
                :data:`CLIP_BYTES_VOCAB_SIZE`.
``gidm_bytes``  the text as is, UTF-8 byte ``b`` -> ``b + 1``, ``0 = pad``, cut at ``max_length`` bytes; an
                empty text is one space. Read by ``defi_jax.gidm.model.ByteTextEncoder`` (257 ids).

``defi_jax.inference`` spells both again for exported artifacts, which load without ``defi_jax.models``.
"""

from __future__ import annotations

import numpy as np

CLIP_BYTES_VOCAB_SIZE = 259
GIDM_BYTES_VOCAB_SIZE = 257
_BOS, _EOS = 1, 2


def clip_bytes(text: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-like byte ids (see the module doc)."""
    seq = [_BOS, *(b + 3 for b in " ".join(text.split()).lower().encode("utf-8")), _EOS]
    if len(seq) > max_length:
        seq = seq[:max_length - 1] + [_EOS]
    ids = np.full((max_length,), _EOS, np.int32)
    mask = np.zeros((max_length,), np.int32)
    ids[:len(seq)], mask[:len(seq)] = seq, 1
    return ids, mask


def gidm_bytes(text: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte + 1 ids, 0-padded (see the module doc)."""
    raw = text.encode("utf-8")[:max_length] or b" "
    ids = np.zeros((max_length,), np.int32)
    ids[:len(raw)] = np.frombuffer(raw, np.uint8).astype(np.int32) + 1
    return ids, (ids > 0).astype(np.int32)
