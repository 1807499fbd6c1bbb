"""fxquant: a low-bit compiler for speech recognition models on CPUs.

    >>> import fxquant
    >>> cm = fxquant.compile_lowbit(model, (example,), avg_bits=3.0)   # doctest: +SKIP

Public names are imported lazily, so `import fxquant` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "compile_lowbit": "fxquant.api",
    "default_pipeline": "fxquant.api",
    "capture": "fxquant.tracing",
    "register_pass": "fxquant.registry",
    "PassResult": "fxquant.registry",
    "PassContext": "fxquant.registry",
    "available_passes": "fxquant.registry",
    "API_VERSION": "fxquant.registry",
    "Pipeline": "fxquant.pipeline",
    "PassManager": "fxquant.passmanager",
    "QuantDecision": "fxquant.ir",
    "QuantizedWeight": "fxquant.qweight",
    "CompiledModule": "fxquant.runtime",
    "FxQuantError": "fxquant.errors",
    "CaptureError": "fxquant.errors",
    "PipelineError": "fxquant.errors",
    "PluginError": "fxquant.errors",
    "PassFailure": "fxquant.errors",
    "ConfigError": "fxquant.errors",
    "ArtifactError": "fxquant.errors",
    "load": "fxquant.artifact",
    "transcribe": "fxquant.asr",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fxquant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
