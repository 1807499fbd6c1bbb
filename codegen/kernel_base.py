"""The base of every compiled-kernel callable (linear, conv, attention): name, target, C source, guards.

Kept apart from kernels.py so that the attention and linear kernel modules share it without importing
each other.

Example:
    >>> issubclass(__import__("fxquant.codegen.kernels", fromlist=["LinearKernel"]).LinearKernel, _Kernel)
    True
"""
from __future__ import annotations

from functools import lru_cache

from .targets import Target, resolve_target

__all__ = ["_Kernel", "target_kernel"]


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


def target_kernel(cls, template: str, target, cache_dir: str | None = None):
    """cls(name, target, source, lib) for a kernel with one library per target (no per-layer constants):
    the template rendered as `<template stem>_<target>`, built once per process, cached on disk by content
    hash (codegen.kv_quant.row_quantizer, codegen.embedding_rows.embedding_rows)."""
    cache = None if cache_dir is None else str(cache_dir)
    return _target_kernel(cls, template, resolve_target(target), cache)


@lru_cache(maxsize=None)
def _target_kernel(cls, template: str, target: Target, cache_dir: str | None):
    from .render import render
    from .threadpool import load_kernel_library

    name = f"{template.split('.')[0]}_{target.name}"
    src = render(template, name=name, family=target.family)
    return cls(name, target, src, load_kernel_library(src, name, target.flags, cache_dir))
