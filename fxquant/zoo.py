"""Named model factories for the CLI and examples: each returns (model, example_inputs).

Example inputs use batch 2: torch.export fixes axes of size 1, so a batch-1 example would pin the batch.

`module.path:callable` works wherever a zoo name does, as long as the callable returns the same pair.

Example:
    >>> model, inputs = load_factory("kws-cnn")
    >>> model(*inputs).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError


class KeywordCNN(nn.Module):
    """The small voice-command CNN of the mission's source article: 10x10 features -> 10 commands."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 10 * 10, 128)
        self.fc2 = nn.Linear(128, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def kws_cnn() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return KeywordCNN().eval(), (torch.randn(2, 1, 10, 10),)


def bcresnet() -> tuple[nn.Module, tuple]:
    from .models.bcresnet import load_bcresnet

    return load_bcresnet(), (torch.randn(2, 1, 40, 32),)


def digits() -> tuple[nn.Module, tuple]:
    from .models import digits as d

    model = d.load_digits_model()
    return model, (torch.randn(2, model.config.n_mels, 200),)


ZOO: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "kws-cnn": kws_cnn,
    "bcresnet": bcresnet,
    "digits": digits,
}


def load_factory(spec: str) -> tuple[nn.Module, tuple]:
    """Resolve a zoo name or 'module.path:callable' and call it."""
    if spec in ZOO:
        fn = ZOO[spec]
    elif ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load factory {spec!r}: {exc}; give 'module.path:callable' importable "
                              f"from the current environment") from exc
    else:
        raise ConfigError(
            f"unknown model {spec!r}; give a zoo name ({', '.join(ZOO)}) or 'module.path:callable'"
        )
    result = fn()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ConfigError(
            f"factory {spec!r} must return (model, example_inputs), got {type(result).__name__}"
        )
    model, inputs = result
    return model, inputs if isinstance(inputs, tuple) else (inputs,)
