"""The base of every compiled-kernel callable (linear, conv, attention): name, target, C source, guards.

Kept apart from kernels.py so that the attention and linear kernel modules share it without importing
each other.

Example:
    >>> issubclass(__import__("fxquant.codegen.kernels", fromlist=["LinearKernel"]).LinearKernel, _Kernel)
    True
"""
from __future__ import annotations

from .targets import Target

__all__ = ["_Kernel"]


class _Kernel:
    """Common state: name, target, C source, and a guard for targets the host cannot run."""

    def __init__(self, name: str, target: Target, source: str):
        self.name, self.target, self.source = name, target, source
        self.runnable = target.runnable()

    def _check(self) -> None:
        if not self.runnable:
            raise RuntimeError(f"kernel {self.name} targets {self.target.name!r}, which this CPU cannot run "
                               f"(needs {', '.join(self.target.required)}); compile with target='native'")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def __deepcopy__(self, memo) -> "_Kernel":
        return self  # immutable: copies of a module may share its compiled kernel

    def __reduce__(self):
        raise TypeError(f"compiled kernel {self.name} cannot be pickled; save the model without kernels "
                        "(attach_kernels(gm, target='reference')) and re-attach them after loading")
