"""load_tokenizer: Mixtral's SentencePiece model from mistral-common and a tokenizer.json; round
trips, streaming decode, BOS / EOS from a checkpoint's config."""
import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sphinx_model import load_tokenizer
from sphinx_model.demo import mistral_tokenizer_path, train_bpe_tokenizer

MISTRAL = mistral_tokenizer_path()
needs_mistral = pytest.mark.skipif(MISTRAL is None, reason="mistral-common is not installed")

SAMPLES = ["Hello world", " leading space", "two  spaces\n\nand newlines\n", "héllo wörld",
           "日本語のテキスト", "emoji 😀👍🏽 end", "tabs\tand ###separators###", "", "a"]


@pytest.fixture(scope="module")
def mistral():
    return load_tokenizer(MISTRAL)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here, in a checkpoint-like folder."""
    folder = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(SAMPLES * 3 + ["the cat sat on the mat"] * 5, folder / "tokenizer.json",
                        vocab_size=400)
    return folder


@needs_mistral
def test_mistral_sentencepiece_loads_with_its_ids(mistral):
    assert (mistral.vocab_size, mistral.bos_id, mistral.eos_id) == (32000, 1, 2)
    ids = mistral.encode("Hello world")
    assert ids and mistral.bos_id not in ids and mistral.eos_id not in ids
    assert all(0 <= i < 32000 for i in ids)


@needs_mistral
@pytest.mark.parametrize("text", SAMPLES)
def test_mistral_round_trip_and_streaming(mistral, text):
    ids = mistral.encode(text)
    full = mistral.decode(ids)
    assert full == text
    stream = mistral.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == full
    assert all("\ufffd" not in p for p in pieces)  # no half characters printed


@needs_mistral
@settings(max_examples=25, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_mistral_streaming_equals_full_decode(mistral, text):
    ids = mistral.encode(text)
    stream = mistral.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == mistral.decode(ids)


@needs_mistral
def test_streaming_holds_back_an_incomplete_character(mistral):
    ids = mistral.encode("😀")  # byte fallback: four byte tokens after the space
    stream = mistral.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert pieces[-1] == "😀" and not any(pieces[:-1])


@needs_mistral
def test_continuation_has_no_leading_space_token(mistral):
    assert mistral.encode_continuation(" Human:") == mistral.encode("Human:")
    assert mistral.encode_continuation("\n###") == mistral.encode("x\n###")[1:]


@needs_mistral
def test_config_json_ids_override_and_pickle(mistral, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(MISTRAL.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": [7, 2]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (5, 7)
    assert load_tokenizer(tmp_path, bos_id=1).bos_id == 1
    # A SphinxConfig's config.json carries them under llm.
    (tmp_path / "config.json").write_text(json.dumps({"llm": {"bos_token_id": 3,
                                                               "eos_token_id": 4}}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (3, 4)
    clone = pickle.loads(pickle.dumps(tok))
    assert (clone.bos_id, clone.encode("a b c")) == (3, mistral.encode("a b c"))


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_json_round_trip_and_streaming(bpe, text):
    tok = load_tokenizer(bpe)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level: exact, spaces included
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text
    assert tok.encode_continuation(" the cat") == tok.encode(" the cat")


def test_tokenizer_json_special_tokens_from_tokenizer_config(bpe, tmp_path):
    (tmp_path / "tokenizer.json").write_text((bpe / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "</s>"}, "eos_token": "<unk>"}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (2, 0)
    (tmp_path / "copy").mkdir()
    saved = tok.save_pretrained(tmp_path / "copy")
    assert saved.name == "tokenizer.json"
    assert load_tokenizer(saved, bos_id=2, eos_id=0).encode("the cat") == tok.encode("the cat")


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nothing")
    with pytest.raises(ValueError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(tmp_path / "x.json")


@needs_mistral
def test_ids_outside_the_vocabulary_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="bos_id = 40000"):
        load_tokenizer(MISTRAL, bos_id=40000)
