"""The pure-Python BERT tokenizer and MiniLM's real-sentence inputs.

Offline tests use a tiny hand-made vocabulary; the network tests fetch the real BERT uncased
vocab (and MiniLM) and check ids that the reference tokenizer.json gives, and that MiniLM's
sentence embeddings of real text behave like language (paraphrases closer than unrelated).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models import text
from models.fetch import fetch
from models.text import WordPieceTokenizer

TINY_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "hello",
    "world",
    ",",
    "!",
    ".",
    "un",
    "##aff",
    "##able",
    "##a",
    "cafe",
    "中",
    "国",
    "run",
    "##ning",
    "##n",
    "'",
    "s",
]


@pytest.fixture
def tiny() -> WordPieceTokenizer:
    return WordPieceTokenizer(TINY_VOCAB)


# ---- offline: the rules, on a tiny vocabulary --------------------------------------------


def test_basic_tokenization_cleans_lowercases_strips_accents_and_splits(tiny):
    assert tiny.basic_tokenize("  Hello,\tWORLD!\n") == ["hello", ",", "world", "!"]
    assert tiny.basic_tokenize("Café") == ["cafe"]  # NFD, combining accent dropped
    assert tiny.basic_tokenize("a\x00b\ufffdc\u200bd") == ["abcd"]  # NUL, U+FFFD, Cf dropped
    assert tiny.basic_tokenize("x\u00a0y") == ["x", "y"]  # no-break space is whitespace
    assert tiny.basic_tokenize("中国ok") == ["中", "国", "ok"]  # CJK chars stand alone
    assert tiny.basic_tokenize("it's $5") == ["it", "'", "s", "$", "5"]
    assert tiny.basic_tokenize("«a»—b") == ["«", "a", "»", "—", "b"]  # Unicode punctuation
    assert tiny.basic_tokenize("say [MASK] now") == ["say", "[MASK]", "now"]


def test_wordpiece_is_greedy_longest_match_first(tiny):
    assert tiny.wordpiece("unaffable") == ["un", "##aff", "##able"]
    assert tiny.wordpiece("running") == ["run", "##ning"]  # not run ##n ...
    assert tiny.wordpiece("runa") == ["run", "##a"]
    assert tiny.wordpiece("unx") == ["[UNK]"]  # one unmatchable piece: the whole word
    assert tiny.wordpiece("un" + "a" * 98) == ["un", *["##a"] * 98]  # 100 chars: still split
    assert tiny.wordpiece("un" + "a" * 99) == ["[UNK]"]  # 101 chars: too long


def test_encode_frames_and_truncates(tiny):
    v = tiny.vocab
    assert tiny.encode("Hello, world!") == [2, v["hello"], v[","], v["world"], v["!"], 3]
    assert tiny.encode("Hello, world!", max_length=4) == [2, v["hello"], v[","], 3]
    assert tiny.decode(tiny.encode("Unaffable running")) == "[CLS] unaffable running [SEP]"
    with pytest.raises(ValueError):
        tiny.encode("hello", max_length=1)


def test_encode_batch_pads_to_the_longest_row(tiny):
    batch = tiny.encode_batch(["hello", "hello, world!", ""], max_length=64)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == mask.shape == (3, 6)
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]]
    assert (ids[mask == 0] == tiny.pad_id).all()
    assert ids[:, 0].tolist() == [tiny.cls_id] * 3
    assert tiny.encode_batch(["hello world " * 50], max_length=8)["input_ids"].shape == (1, 8)


def test_a_vocab_without_special_tokens_is_rejected():
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[SEP]", "[MASK]", "a"])


def test_the_sentence_file_is_real_varied_text():
    sentences = text.load_sentences()
    assert len(sentences) >= 200
    assert len(set(sentences)) == len(sentences)
    assert text.SENTENCES_PATH.stat().st_size < 40_000
    assert all(s[0].isupper() and s[-1] in ".?!" for s in sentences)


# ---- network: the real vocabulary and MiniLM ---------------------------------------------

# Ids as the reference tokenizer.json (``tokenizers`` library) gives them, [CLS]/[SEP] included.
KNOWN_IDS = {
    "Hello, world!": [101, 7592, 1010, 2088, 999, 102],
    "The unaffable tokenizer handles embeddings.": [
        101,
        1996,
        14477,
        20961,
        3468,
        19204,
        17629,
        16024,
        7861,
        8270,
        4667,
        2015,
        1012,
        102,
    ],  # fmt: skip
    "Café naïve résumé": [101, 7668, 15743, 13746, 102],
    "北京是中国的首都": [101, 1781, 1755, 100, 1746, 1799, 1916, 100, 1961, 102],
    "e-mail: a@b.com $5.00 (approx.)": [
        101,
        1041,
        1011,
        5653,
        1024,
        1037,
        1030,
        1038,
        1012,
        4012,
        1002,
        1019,
        1012,
        4002,
        1006,
        22480,
        1012,
        1007,
        102,
    ],  # fmt: skip
    "don't stop [MASK]": [101, 2123, 1005, 1056, 2644, 103, 102],
    "x" * 101: [101, 100, 102],
}


@pytest.fixture(scope="module")
def bert() -> WordPieceTokenizer:
    return text.default_tokenizer()


@pytest.mark.network
def test_the_real_vocab_has_bert_uncased_special_ids(bert):
    assert text.vocab_path().is_file()
    assert len(bert) == 30522
    assert [bert.vocab[t] for t in text.SPECIAL_TOKENS] == [0, 100, 101, 102, 103]


@pytest.mark.network
@pytest.mark.parametrize("sentence", list(KNOWN_IDS))
def test_ids_match_the_reference_tokenizer(bert, sentence):
    assert bert.encode(sentence) == KNOWN_IDS[sentence]


@pytest.mark.network
def test_word_pieces_of_the_real_vocab(bert):
    assert bert.tokenize("unaffable") == ["una", "##ffa", "##ble"]
    assert bert.tokenize("tokenizer") == ["token", "##izer"]
    assert bert.tokenize("embeddings") == ["em", "##bed", "##ding", "##s"]
    assert bert.decode(bert.encode("Embeddings, tokenized!")) == (
        "[CLS] embeddings , tokenized ! [SEP]"
    )


@pytest.mark.network
def test_minilm_dataset_writes_padded_samples_on_axis_0(tmp_path: Path):
    sentences = text.load_sentences()
    path = text.minilm_dataset(tmp_path / "d.npz", n=len(sentences) + 5, max_length=12)
    with np.load(path) as arrays:
        ids, mask = arrays["input_ids"], arrays["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == mask.shape == (len(sentences) + 5, 12)  # some sentences are longer
    assert (ids[:, 0] == 101).all() and (mask[:, 0] == 1).all()
    assert (ids[mask == 0] == 0).all()
    assert (ids[len(sentences)] == ids[0]).all()  # cycled
    assert ((ids == 102).sum(axis=1) == 1).all()  # one [SEP] per row, even when truncated


@pytest.mark.network
def test_cli_writes_an_npz(tmp_path: Path, capsys):
    out = tmp_path / "sub" / "minilm.npz"
    assert text.main(["--out", str(out), "-n", "7"]) == 0
    with np.load(out) as arrays:
        assert sorted(arrays.files) == ["attention_mask", "input_ids"]
        assert arrays["input_ids"].shape[0] == 7
    assert "7x" in capsys.readouterr().out


# Adjacent lines of text_sentences.txt that say the same thing, and two that do not.
PARAPHRASE = (
    "Scientists have discovered a new species of frog in the cloud forests of Ecuador.",
    "A previously unknown frog species has been found by researchers in Ecuador's cloud forests.",
)
UNRELATED = (
    "Scientists have discovered a new species of frog in the cloud forests of Ecuador.",
    "Please remember to bring your passport and a printed copy of the booking.",
)


def _sentence_embeddings(sentences: list[str]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(fetch("minilm")), options, providers=["CPUExecutionProvider"]
    )
    outputs = session.run(None, text.encode_batch(sentences))
    (pooled,) = [o for o in outputs if o.ndim == 2 and o.dtype == np.float32]
    assert pooled.shape == (len(sentences), 384)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


@pytest.mark.network
def test_minilm_embeds_paraphrases_closer_than_unrelated_sentences():
    sentences = text.load_sentences()
    assert set(PARAPHRASE) | set(UNRELATED) <= set(sentences)
    e = _sentence_embeddings([*PARAPHRASE, UNRELATED[1]])
    paraphrase, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert paraphrase > 0.8 and unrelated < 0.3
    assert paraphrase > unrelated + 0.5


@pytest.mark.network
def test_minilm_finds_the_paraphrase_pairs_of_the_sentence_file():
    # The file holds ~20 paraphrase pairs on adjacent lines. Real language for this model means
    # the most similar adjacent pairs are far above the typical adjacent (unrelated) pair.
    e = _sentence_embeddings(text.load_sentences())
    adjacent = np.sum(e[:-1] * e[1:], axis=1)
    assert (adjacent > 0.5).sum() >= 20
    assert np.median(adjacent) < 0.2
