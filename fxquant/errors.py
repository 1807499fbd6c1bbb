"""Every error fxquant raises on bad input; each message says what was wrong and what to do."""


class FxQuantError(Exception):
    """Base class of fxquant's user-facing errors."""


class CaptureError(FxQuantError):
    """The model could not be captured as an fx graph (both tracers failed)."""


class PipelineError(FxQuantError):
    """A pipeline names an unknown pass, an unknown option, or a value of the wrong type."""


class PluginError(FxQuantError):
    """A plugin pass could not be loaded or was written for another pass-API version."""


class PassFailure(FxQuantError):
    """A pass raised; the message names it, the passes before it and the reproducer path."""


class VerificationError(FxQuantError):
    """A graph broke the IR contract after a pass."""


class ConfigError(FxQuantError, ValueError):
    """An option of compile_lowbit (bits, rules, budget, calibration, ...) is invalid."""


class ArtifactError(FxQuantError):
    """A saved artifact is missing, truncated, corrupted or from an incompatible version."""


class InputError(FxQuantError, ValueError):
    """A compiled module was called with inputs its graph was not specialised for."""


class ModelNotFoundError(FxQuantError):
    """A model name or path resolves to nothing on this machine (the message names the install command)."""


class CheckpointError(FxQuantError, ValueError):
    """A model checkpoint (model.bin, safetensors, .pt) is truncated, corrupted or of an unknown layout."""


class AudioError(FxQuantError, ValueError):
    """An audio file is unreadable, not audio, empty or too long (the message lists the formats that work)."""


class AudioNotFoundError(AudioError, FileNotFoundError):
    """An audio path names no file."""
