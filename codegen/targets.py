"""Code-generation targets: which ISA a kernel is written for and the compiler flags it needs.

Three targets exist: "avx512" (F/BW/VL/VNNI/VBMI: hand-written LUT + vpdpbusd kernels), "avx2"
(AVX2+FMA: the portable templates auto-vectorized for AVX2) and "portable" (plain C).  "native"
picks the best one the host can run; "reference" means "no compiled kernel" (the PyTorch oracle).

Example:
    >>> t = resolve_target("portable")
    >>> t.name, "-fopenmp-simd" in t.flags, "-fopenmp" in t.flags
    ('portable', True, False)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# -fopenmp-simd: the `omp simd` hints only; threads come from fxquant's own pool (threadpool.py), not libgomp
COMMON_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-std=gnu11")


@dataclass(frozen=True)
class Target:
    """One ISA target: name, the cpuinfo flags it requires, extra compiler flags, template family."""

    name: str
    required: tuple[str, ...]
    isa_flags: tuple[str, ...]
    family: str  # "avx512" (intrinsics templates) or "portable" (plain C templates)

    @property
    def flags(self) -> tuple[str, ...]:
        return COMMON_FLAGS + self.isa_flags

    def runnable(self, host_flags: frozenset[str] | None = None) -> bool:
        """True if the host CPU has every instruction set this target needs."""
        have = host_cpu_flags() if host_flags is None else host_flags
        return all(f in have for f in self.required)


TARGETS: dict[str, Target] = {
    "avx512": Target("avx512", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"),
                     ("-march=x86-64-v4", "-mavx512vnni", "-mavx512vbmi"), "avx512"),
    "avx2": Target("avx2", ("avx2", "fma"), ("-march=x86-64-v3", "-mavx2", "-mfma"), "portable"),
    "portable": Target("portable", (), (), "portable"),
}


@lru_cache(maxsize=1)
def host_cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The `flags` line of /proc/cpuinfo as a set (empty if the file is unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def detect_host(host_flags: frozenset[str] | None = None) -> Target:
    """Best target the host can run: avx512 > avx2 > portable."""
    for name in ("avx512", "avx2"):
        if TARGETS[name].runnable(host_flags):
            return TARGETS[name]
    return TARGETS["portable"]


def resolve_target(name: str | Target) -> Target:
    """Map "native" / a target name to a Target; raise ValueError listing the valid names."""
    if isinstance(name, Target):
        return name
    if name == "native":
        return detect_host()
    if name not in TARGETS:
        raise ValueError(f"unknown codegen target {name!r}; choose one of "
                         f"{['native', *TARGETS, 'reference']}")
    return TARGETS[name]
