"""CLIP's byte-level BPE tokenizer, host-side (pure Python + ``regex``), equal to transformers' ``CLIPTokenizer``.

The vocabulary is not shipped with defi-jax (it cannot be downloaded here). Point the tokenizer at any
folder laid out like transformers' CLIP tokenizer folders, i.e. containing ``vocab.json`` and
``merges.txt`` (optionally ``tokenizer_config.json`` / ``special_tokens_map.json`` for a non-default pad
token) -- for example a local snapshot of ``openai/clip-vit-base-patch32``::

    tok = CLIPTokenizer.from_folder("/ckpt/clip-vit-base-patch32")
    ids_BL, mask_BL = tok(["Pick up the red block"], max_length=20)   # int32 numpy, DeFI uses 20
    # ids_BL[0] = [49406 (bos), ..., 49407 (eos), 49407 (pad), ...], mask 1 on real tokens

Behaviour (transformers 5 ``CLIPTokenizer``): NFC normalisation, whitespace runs collapsed to one space,
lower-casing; pre-tokenization by CLIP's regex (``'s|'t|'re|'ve|'m|'ll|'d|letters+|one digit|other
symbols+``); GPT-2 byte-to-unicode mapping; BPE with ``</w>`` appended to the last symbol of each word;
``<|startoftext|>`` / ``<|endoftext|>`` around the sequence; truncation keeps room for both; padding
with the pad token (``<|endoftext|>`` by default) on the right.
"""

from __future__ import annotations

import functools
import json
import os
import unicodedata
from collections.abc import Sequence

import numpy as np
import regex

_PRE_TOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_WHITESPACE = regex.compile(r"\s+")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class CLIPTokenizer:
    """``tokenizer(texts, max_length=77) -> (input_ids[B, max_length], attention_mask[B, max_length])``."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
                 pad_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>", model_max_length: int = 77):
        self.vocab = dict(vocab)
        for name, tok in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                          ("unk_token", unk_token)):
            if tok not in self.vocab:
                raise KeyError(f"{name} {tok!r} is not in the vocabulary")
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.bos_token_id = self.vocab[bos_token]
        self.eos_token_id = self.vocab[eos_token]
        self.pad_token_id = self.vocab[pad_token]
        self.unk_token_id = self.vocab[unk_token]
        self.special = {bos_token: self.bos_token_id, eos_token: self.eos_token_id}
        self.model_max_length = model_max_length
        self._byte_chars = bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, path: str, **overrides) -> "CLIPTokenizer":
        """Reads ``vocab.json`` + ``merges.txt`` (transformers' CLIP tokenizer folder layout)."""
        vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        for f in (vocab_file, merges_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f} not found: a CLIP tokenizer folder needs vocab.json and merges.txt")
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        merges = []
        with open(merges_file, encoding="utf-8") as f:
            for n, line in enumerate(f):
                line = line.rstrip("\n")
                if (n == 0 and line.startswith("#version")) or not line.strip():
                    continue
                parts = line.split(" ")
                if len(parts) != 2:
                    raise ValueError(f"{merges_file}:{n + 1}: expected two symbols, got {line!r}")
                merges.append((parts[0], parts[1]))
        kwargs = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                continue
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                val = data.get(key)
                val = val.get("content") if isinstance(val, dict) else val  # AddedToken serialisation
                if isinstance(val, str):
                    kwargs.setdefault(key, val)
            # transformers writes a huge sentinel when no limit is set; keep CLIP's 77 then.
            if isinstance(data.get("model_max_length"), int) and data["model_max_length"] < 10**6:
                kwargs.setdefault("model_max_length", data["model_max_length"])
        return cls(vocab, merges, **(kwargs | overrides))

    def _bpe(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        # Symbols missing from the vocabulary become unknown and never merge (tokenizers' BPE behaviour).
        while len(symbols) > 1:
            best = None
            for i in range(len(symbols) - 1):
                rank = self.ranks.get((symbols[i], symbols[i + 1]))
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, i)
            if best is None:
                break
            a, b = symbols[best[1]], symbols[best[1] + 1]
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.vocab.get(s, self.unk_token_id) for s in symbols]
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one text without bos / eos."""
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).lower()
        ids = []
        for piece in _PRE_TOKENIZE.findall(text):
            if piece in self.special:
                ids.append(self.special[piece])
            else:
                ids.extend(self._bpe("".join(self._byte_chars[b] for b in piece.encode("utf-8"))))
        return ids

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None):
        """Pads / truncates to ``max_length`` (default: the longest text, at most ``model_max_length``)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        seqs = [[self.bos_token_id, *self.encode(t), self.eos_token_id] for t in texts]
        if max_length is None:
            max_length = min(max(len(s) for s in seqs), self.model_max_length)
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for bos and eos")
        ids = np.full((len(seqs), max_length), self.pad_token_id, np.int32)
        mask = np.zeros((len(seqs), max_length), np.int32)
        for row, s in enumerate(seqs):
            if len(s) > max_length:
                s = s[:max_length - 1] + [self.eos_token_id]
            ids[row, :len(s)] = s
            mask[row, :len(s)] = 1
        return ids, mask
