"""Byte-level BPE tokenizer for English and Chinese prompts, trained from scratch on the captions.

Byte-level means every string is representable (no unknown token): text is split GPT-2 style into words,
each word becomes its UTF-8 bytes, and BPE merges frequent byte pairs. A Chinese character is three bytes,
so frequent characters and words become single tokens and rare ones fall back to bytes.

Every encoded prompt is exactly `context_length` ids: [bos, body..., eos, pad, ...]. Long prompts are cut
inside the body so bos and eos always survive; the empty prompt is [bos, eos, pad, ...].
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from engine.stage import atomic_write

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
CONTEXT_LENGTH = 77
# 256 byte symbols + the special tokens: a smaller vocabulary cannot represent every string.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class BPETokenizer:
    """Wraps a `tokenizers.Tokenizer` with fixed-length, padded encoding into a LongTensor."""

    def __init__(self, tokenizer: Tokenizer, context_length: int = CONTEXT_LENGTH):
        if context_length < 2:
            raise ValueError(f"context_length={context_length} leaves no room for the start and end tokens; use >= 2")
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; build it with train_tokenizer()")
        self._tokenizer = tokenizer
        self.context_length = context_length
        self.bos_id: int = tokenizer.token_to_id(BOS_TOKEN)
        self.eos_id: int = tokenizer.token_to_id(EOS_TOKEN)
        self.pad_id: int = tokenizer.token_to_id(PAD_TOKEN)
        self._special_ids = {self.bos_id, self.eos_id, self.pad_id}
        self._json = tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def fingerprint(self) -> str:
        """Hash of tokenizer.json: two tokenizers with equal fingerprints produce identical ids."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()[:16]

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Token ids [len(texts), context_length]: bos, body (truncated to fit), eos, then padding."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of prompts; wrap a single prompt as [prompt]")
        body_length = self.context_length - 2
        ids = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, encoding in enumerate(self._tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            # Special-token text typed into a prompt must not end it early or fake padding: drop those ids.
            body = [i for i in encoding.ids if i not in self._special_ids][:body_length]
            ids[row, 0] = self.bos_id
            ids[row, 1 : 1 + len(body)] = torch.tensor(body, dtype=torch.long)
            ids[row, 1 + len(body)] = self.eos_id
        return ids

    def dropped_tokens(self, text: str) -> int:
        """How many of ``text``'s tokens ``encode`` cuts off to fit the context."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        body = [i for i in encoding.ids if i not in self._special_ids]
        return max(0, len(body) - (self.context_length - 2))

    def fits(self, text: str) -> bool:
        """Whether ``encode`` keeps every token of ``text``."""
        return self.dropped_tokens(text) == 0

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text of one sequence of ids; special tokens are dropped."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode() takes one sequence of ids, got shape {tuple(ids.shape)}; index a row first")
            ids = ids.tolist()
        text = self._tokenizer.decode([i for i in ids if i not in self._special_ids], skip_special_tokens=False)
        # The pre-tokenizer put a space before the first word (so it matches mid-sentence words); take it back.
        return text.removeprefix(" ")

    def save(self, path: str | Path) -> None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(self._json, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | Path, context_length: int = CONTEXT_LENGTH) -> "BPETokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}; train the clip stage first (python -m clip.train)")
        return cls(Tokenizer.from_str(path.read_text(encoding="utf-8")), context_length)


def train_tokenizer(texts: list[str], vocab_size: int, context_length: int = CONTEXT_LENGTH,
                    normalize: bool = False) -> BPETokenizer:
    """Learn byte-level BPE merges from `texts`; the same texts and settings give an identical tokenizer.json.

    ``normalize`` lowercases and strips accents before anything else (as CLIP's and BERT-uncased's tokenizers
    do), so "A Pokémon" and "a pokemon" are the same tokens, and folds full-width and other compatibility forms
    to their plain ones (NFKC's folding), so the captions' "，" and a Chinese prompt typed with "," are both ","
    ("。" and "、" have no plain form and stay); Chinese characters are unchanged. The tokenizer.json keeps the
    setting: a saved tokenizer normalises (or not) as it was trained."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is below {MIN_VOCAB_SIZE} (all bytes + special tokens); raise it")
    if not texts:
        raise ValueError("train_tokenizer() needs at least one text")
    tokenizer = Tokenizer(models.BPE())
    # Leading/trailing whitespace carries no meaning in a prompt; dropping it keeps " cat" and "cat" the same.
    strip = normalizers.Strip()
    # Accents are the combining diacritics (U+0300-U+036F) that NFKD splits off Latin letters: StripAccents would
    # drop every combining mark, kana's voicing marks and emoji's variation selectors with them (ガ -> カ)
    accents = normalizers.Replace(Regex("[\u0300-\u036f]"), "")
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKD(), accents, normalizers.NFC(),
                                                 normalizers.Lowercase(), strip]) if normalize else strip
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so unseen characters still encode
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return BPETokenizer(tokenizer, context_length)
