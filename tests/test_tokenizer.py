"""Tests for expertmesh.tokenizer: encode against sentencepiece and Hugging Face, streaming
detokenisation against its one-line definition (``Tokenizer.completion_text``)."""

from __future__ import annotations

import importlib.resources
import random
import re
import shutil

import pytest
import sentencepiece as spm

from expertmesh.tokenizer import Tokenizer

MODEL_PATH = str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1")
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
ROBOT = [243, 162, 167, 153]  # <0xF0> <0x9F> <0xA4> <0x96>: the bytes of 🤖

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    " one leading space",
    "x  y   z    w",  # runs of spaces: sentencepiece merges "▁▁" last (score -1e9)
    "line one\nline two\n\n\nafter blank lines\n",
    "\n starts with a newline",
    "\ttabs\tand\r\ncarriage returns",
    "café, naïve, déjà vu, Ærøskøbing",
    "日本語のテキストです。",
    "🤖",
    "robots 🤖🤖 and flags 🇫🇷 and family 👨‍👩‍👧",
    "mixed: é 日本語 🤖 ünïcödé Ω≈ç√∫ 中文 한국어",
    "code:\n    def f(x):\n        return x ** 2  # square\n",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(MODEL_PATH)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=MODEL_PATH)


def _hf_tokenizer():
    """The Hugging Face tokenizer that loads Mixtral's sentencepiece file, or None offline."""
    import transformers

    # transformers 4.x: the (slow) LlamaTokenizer wraps sentencepiece itself.
    # (In 5.x both names are one class.)
    for cls in dict.fromkeys([transformers.LlamaTokenizer, transformers.LlamaTokenizerFast]):
        try:
            hf = cls(vocab_file=MODEL_PATH, legacy=True, add_bos_token=True)
        except Exception:
            continue
        if len(hf) == 32000:  # transformers 5.x accepts vocab_file but builds an empty vocab
            return hf
    # transformers 5.x: what AutoTokenizer builds for a directory holding only tokenizer.model,
    # without its slow (~5 s) merge generation, which it discards anyway. (5.x's LlamaTokenizer
    # .from_pretrained on that directory ranks merges by id rather than piece score, and so
    # splits "x  y" as ▁x ▁▁ y where sentencepiece gives ▁x ▁ ▁y: "▁▁" scores -1e9.)
    try:
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        proto = import_protobuf().ModelProto()
        with open(MODEL_PATH, "rb") as f:
            proto.ParseFromString(f.read())
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
        backend = SpmConverter.build_tokenizer_from_spm_proto(proto=proto, vocab=vocab, legacy=True)
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True
        )
    except Exception:
        return None


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    hf = _hf_tokenizer()
    if hf is None:
        pytest.skip("no Hugging Face tokenizer class loads a bare sentencepiece file offline")
    return hf


def stream(tok: Tokenizer, context: list[int], generated: list[int]) -> list[str]:
    """Push `generated` one id at a time after `context`; the deltas, flush's last."""
    detok = tok.detokenizer(context)
    deltas = [detok.push(t) for t in generated]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def check_stream(tok: Tokenizer, context: list[int], generated: list[int]) -> list[str]:
    """Stream and compare with the definition; the deltas."""
    deltas = stream(tok, context, generated)
    expected = tok.completion_text(context, generated)
    assert "".join(deltas) == expected, (context[-8:], generated)
    if "\ufffd" not in expected:
        assert not any("\ufffd" in d for d in deltas), (deltas, generated)
    return deltas


def ends_clean(tok: Tokenizer, ids: list[int]) -> list[int]:
    """`ids` made to end on a character boundary, as every prompt from `encode` does."""
    if ids and BYTE_PIECE.fullmatch(tok.id_to_piece(ids[-1])):
        return [*ids, *tok.encode("end", add_bos=False)]
    return ids


# --- loading -------------------------------------------------------------------------------------


def test_properties(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.id_to_piece(243) == "<0xF0>"
    assert tok.id_to_piece(tok.bos_id) == "<s>"


def test_from_checkpoint(tmp_path):
    shutil.copyfile(MODEL_PATH, tmp_path / "tokenizer.model")
    assert Tokenizer.from_checkpoint(tmp_path).encode("Hi") == Tokenizer(MODEL_PATH).encode("Hi")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_checkpoint(tmp_path / "no_such_dir")


@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model"])
def test_not_a_model_is_a_clear_error(tmp_path, content):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.from_checkpoint(tmp_path)


# --- encode / decode -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_is_sentencepiece_with_bos(tok, sp, text):
    assert tok.encode(text) == [1, *sp.encode(text)]
    assert tok.encode(text, add_bos=False) == sp.encode(text)


def test_encode_empty_is_bos_only(tok):
    assert tok.encode("") == [1]
    assert tok.encode("", add_bos=False) == []


def test_encode_keeps_dummy_prefix(tok):
    assert [tok.id_to_piece(t) for t in tok.encode("Hello world")] == ["<s>", "▁Hello", "▁world"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf, text):
    assert tok.encode(text) == hf.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips_encode(tok, text):
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text  # special ids are skipped


def test_bad_ids_are_value_errors(tok):
    with pytest.raises(ValueError, match="32000"):
        tok.decode([5, 32000])
    with pytest.raises(ValueError):
        tok.id_to_piece(-1)
    with pytest.raises(ValueError):
        tok.detokenizer().push(10**6)


# --- streaming -----------------------------------------------------------------------------------


def test_leading_space_is_kept_after_a_prompt(tok):
    world = tok.encode("world", add_bos=False)  # [▁world]
    assert "".join(stream(tok, tok.encode("Hello"), world)) == " world"
    assert "".join(stream(tok, [], world)) == "world"  # sentencepiece strips it at the very start
    assert "".join(stream(tok, [tok.bos_id], world)) == "world"  # bos alone decodes to nothing


def test_split_emoji_is_held_back_not_replaced(tok):
    detok = tok.detokenizer(tok.encode("I am a"))
    assert detok.push(tok.encode("robot", add_bos=False)[0]) == " robot"
    assert [detok.push(t) for t in [28705, *ROBOT]] == [" ", "", "", "", "🤖"]
    assert detok.flush() == ""
    assert detok.text == " robot 🤖"


def test_flush_decodes_an_unfinished_char_like_sentencepiece(tok):
    detok = tok.detokenizer()
    assert [detok.push(t) for t in ROBOT[:2]] == ["", ""]
    assert detok.flush() == tok.decode(ROBOT[:2]) == "\ufffd\ufffd"
    assert detok.flush() == ""
    with pytest.raises(ValueError, match="flush"):
        detok.push(ROBOT[2])


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", [None, "", "Say it:", "日本", "🤖", "ends with spaces  ", "new\n"])
def test_stream_of_encoded_text(tok, text, prompt):
    context = [] if prompt is None else tok.encode(prompt)
    generated = tok.encode(text, add_bos=False)
    check_stream(tok, context, generated)
    if not context:
        assert "".join(stream(tok, context, generated)) == tok.decode(generated) == text


def test_special_ids_produce_no_text(tok):
    detok = tok.detokenizer(tok.encode("Hi"))
    assert detok.push(tok.bos_id) == ""
    assert detok.push(tok.eos_id) == ""
    # An emoji interrupted by bos, then its remaining bytes: sentencepiece gives U+FFFD per byte.
    generated = [tok.eos_id, *tok.encode("a 🤖", add_bos=False)[:3], tok.bos_id, *ROBOT[1:], tok.eos_id, 0]
    for context in ([], [tok.bos_id], tok.encode("x"), [*tok.encode("y"), tok.eos_id, tok.bos_id]):
        check_stream(tok, context, generated)


def test_stream_of_random_ids(tok):
    rng = random.Random(1234)
    normal = range(3, tok.vocab_size)  # all but <unk>, <s>, </s>
    byte_ids = range(3, 259)
    for trial in range(450):
        if trial % 3 == 0:  # uniform over the vocabulary: byte pieces are rare
            generated = [rng.choice(normal) for _ in range(rng.randrange(1, 40))]
        else:  # byte-heavy: multi-byte characters split, interrupted and invalid
            pools = rng.choices([byte_ids, normal], weights=[0.7, 0.3], k=rng.randrange(1, 40))
            generated = [rng.choice(pool) for pool in pools]
        if trial % 3 == 2:  # <unk>, <s>, </s> sprinkled in: they end byte runs
            generated = [rng.choice([0, 1, 2]) if rng.random() < 0.15 else t for t in generated]
        context = ends_clean(tok, [rng.choice(normal) for _ in range(rng.randrange(0, 6))])
        check_stream(tok, context, generated)
        check_stream(tok, [], generated)


def test_stream_of_reencoded_emoji_and_cjk(tok):
    rng = random.Random(7)
    alphabet = ["🤖", "🇫🇷", "日", "本", "語", "é", "ü", " ", "  ", "\n", "a", "The", "한", "Ω", "𝔘"]
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 25)))
        generated = tok.encode(text, add_bos=False)
        for context in ([], tok.encode(rng.choice(alphabet)), tok.encode("prompt:\n")):
            deltas = check_stream(tok, context, generated)
            assert not any("\ufffd" in d for d in deltas)


def test_context_ending_mid_character_is_rejected(tok):
    context = [*tok.encode("x"), *ROBOT[:2]]
    with pytest.raises(ValueError, match="multi-byte"):
        tok.detokenizer(context)
    with pytest.raises(ValueError, match="multi-byte"):
        tok.completion_text(context, ROBOT[2:])
    check_stream(tok, [*tok.encode("x"), ROBOT[1]], ROBOT[1:])  # a stray continuation byte is final


def test_stream_decodes_a_bounded_window(tok, monkeypatch):
    """Per-token cost must not grow with the sequence: every decode sees a few recent ids."""
    text = "Streaming 🤖 detokenisation, 日本語 and plain words. " * 60
    context = tok.encode(text)
    generated = tok.encode(text, add_bos=False)
    assert len(context) > 1000 and len(generated) > 1000
    expected = tok.completion_text(context, generated)
    sizes = []
    decode = spm.SentencePieceProcessor.decode

    def spy(self, ids, *args, **kwargs):
        sizes.append(len(ids))
        return decode(self, ids, *args, **kwargs)

    monkeypatch.setattr(spm.SentencePieceProcessor, "decode", spy)
    assert "".join(stream(tok, context, generated)) == expected
    assert len(sizes) >= len(generated) and max(sizes) <= 8
