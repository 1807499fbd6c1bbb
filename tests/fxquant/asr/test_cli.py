"""`fxquant transcribe` with Whisper: formats, errors with exit code 2, and the Python API."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from fxquant.cli import main
from fxquant.textnorm import normalize_english


@pytest.fixture(scope="module")
def stereo_44k(tmp_path_factory, lj_clips):
    """LJ001-0002 as a 44.1 kHz stereo OGG (the CLI must resample and mix down)."""
    from fxquant.audio import load_audio
    import soxr

    wave = load_audio(lj_clips[1].path).numpy()
    up = soxr.resample(wave, 16000, 44100)
    path = tmp_path_factory.mktemp("audio") / "clip.ogg"
    sf.write(path, np.stack([up, up * 0.5], axis=1), 44100)
    return path


def test_transcribe_tsv_and_json(tiny_ckpt, stereo_44k, lj_clips, capsys):
    assert main(["transcribe", str(stereo_44k), str(lj_clips[1].path), "--format", "tsv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, (stereo_44k, lj_clips[1].path)):
        name, text = line.split("\t")
        assert name == str(path)
        assert normalize_english(text) == normalize_english(lj_clips[1].text)
    assert main(["transcribe", str(lj_clips[1].path), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["path"] == str(lj_clips[1].path) and data[0]["temperature"] == [0.0]


@pytest.mark.parametrize("content,what", [(None, "not found"), (b"this is not audio", "audio")])
def test_bad_files_exit_2(tmp_path, capsys, content, what):
    import gc

    path = tmp_path / "x.wav"
    if content is not None:
        path.write_bytes(content)
    assert main(["transcribe", str(path)]) == 2
    err = capsys.readouterr().err
    assert "fxquant: error:" in err and what in err.lower() and "Traceback" not in err
    assert gc.isenabled()                       # the command turns the collector off while it runs, not after
    gc.disable()
    try:                                        # ... and leaves it off for a caller that had it off
        assert main(["transcribe", str(path)]) == 2 and not gc.isenabled()
    finally:
        gc.enable()


def test_missing_checkpoint_exit_2(tmp_path, capsys, lj_clips):
    assert main(["transcribe", str(lj_clips[1].path), "--model", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_api(tiny_ckpt, lj_clips):
    import fxquant

    texts = fxquant.transcribe("whisper-tiny.en", [lj_clips[1].path])
    assert normalize_english(texts[0]) == normalize_english(lj_clips[1].text)


def test_batch_size_changes_the_batching_not_the_text(tiny_ckpt, lj_clips, capsys, monkeypatch):
    from fxquant.asr import transcriber as tr

    sizes = []
    real = tr.Transcriber.decode
    monkeypatch.setattr(tr.Transcriber, "decode", lambda self, mels, *a: sizes.append(mels.shape[0]) or
                        real(self, mels, *a))
    paths = [str(c.path) for c in lj_clips[1:4]]
    assert main(["transcribe", *paths, "--format", "tsv"]) == 0
    batched = capsys.readouterr().out
    assert main(["transcribe", *paths, "--format", "tsv", "--batch-size", "1"]) == 0
    assert capsys.readouterr().out == batched and sizes == [3, 1, 1, 1]


@pytest.mark.parametrize("argv, needle", [(["--batch-size", "0"], "--batch-size must be at least 1"),
                                          (["--model", "digits", "--batch-size", "2"], "applies to Whisper")])
def test_bad_batch_size_exit_2(lj_clips, capsys, argv, needle):
    assert main(["transcribe", str(lj_clips[1].path), *argv]) == 2
    assert needle in capsys.readouterr().err
