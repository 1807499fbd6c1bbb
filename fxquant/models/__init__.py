"""Speech models used as compiler workloads.

- bcresnet: BC-ResNet-2 keyword spotter (pretrained weights in the shared dir), FSDD accuracy eval.
- whisper: Whisper-architecture encoder/decoder (openai-whisper names), KV-cached greedy decoding.
- digits: small connected-digit CTC recognizer trained here (weights/digits.pt).

Example:
    >>> from fxquant.models import load_digits_model, transcribe    # doctest: +SKIP
"""
from fxquant.models.bcresnet import LABELS, BCResNet, keyword_accuracy, load_bcresnet
from fxquant.models.digits import DigitsCTC, load_digits_model, transcribe
from fxquant.models.whisper import ModelDimensions, Whisper, greedy_decode, load_whisper, whisper_random

__all__ = ["LABELS", "BCResNet", "keyword_accuracy", "load_bcresnet", "DigitsCTC", "load_digits_model",
           "transcribe", "ModelDimensions", "Whisper", "greedy_decode", "load_whisper", "whisper_random"]
