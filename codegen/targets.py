"""Code-generation targets are data: one `Target` row per ISA in the `TARGETS` table.

A row holds the /proc/cpuinfo flags the host must have, the compiler flags, the template family
(which templates of `kernel_table.KERNELS` render its kernels: "avx512" intrinsics or "portable" C)
and its tuning constants (measured on the hosts named in benchmarks/RESULTS.md). Three targets exist:
"avx512" (F/BW/VL/VNNI/VBMI: hand-written LUT + vpdpbusd kernels), "avx2" (AVX2+FMA: the portable
templates auto-vectorized for AVX2) and "portable" (plain C). "native" picks the first runnable row
in `PREFERENCE`; "reference" means "no compiled kernel" (the PyTorch oracle). See README "Adding a target".

Example:
    >>> t = resolve_target("portable")
    >>> t.name, "-fopenmp-simd" in t.flags, "-fopenmp" in t.flags
    ('portable', True, False)
    >>> tuning("avx512")["mm_mt"], tuning("portable") == DEFAULT_TUNING
    (4, True)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# -fopenmp-simd: the `omp simd` hints only; threads come from fxquant's own pool (threadpool.py), not libgomp
COMMON_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-std=gnu11")
DEFAULT_TUNING = {
    "par_min_macs": 1 << 23,  # below this many MACs per call a linear kernel runs on one thread
    "mm_mt": 4,  # activation rows per register tile of the large-M avx512 kernel
    "fast_permb": True,  # 2/4-bit shared tables: mask-free vpermb expansion (fewer ALU ops than vpshufb)
    "prefetch": 0,  # bytes ahead to prefetch in the matrix-vector stream (0 = hardware prefetch only)
}


@dataclass(frozen=True)
class Target:
    """One ISA target: name, the cpuinfo flags it requires, extra compiler flags, template family, tuning."""

    name: str
    required: tuple[str, ...]
    isa_flags: tuple[str, ...]
    family: str  # "avx512" (intrinsics templates) or "portable" (plain C templates)
    tuning: dict = field(default_factory=dict, compare=False, hash=False)  # overrides of DEFAULT_TUNING

    @property
    def flags(self) -> tuple[str, ...]:
        return COMMON_FLAGS + self.isa_flags

    def runnable(self, host_flags: frozenset[str] | None = None) -> bool:
        """True if the host CPU has every instruction set this target needs."""
        have = host_cpu_flags() if host_flags is None else host_flags
        return all(f in have for f in self.required)


TARGETS: dict[str, Target] = {
    "avx512": Target(
        "avx512",
        ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"),
        ("-march=x86-64-v4", "-mavx512vnni", "-mavx512vbmi"),
        "avx512",
        tuning={"par_min_macs": 1 << 23, "mm_mt": 4, "fast_permb": True, "prefetch": 0},
    ),
    "avx2": Target("avx2", ("avx2", "fma"), ("-march=x86-64-v3", "-mavx2", "-mfma"), "portable"),
    "portable": Target("portable", (), (), "portable"),
}
PREFERENCE = ("avx512", "avx2")  # "native": the first of these the host can run, else "portable"


def target_names() -> tuple[str, ...]:
    """Every value of a `target` option: "native", each row of TARGETS, and "reference" (no kernels)."""
    return ("native", *TARGETS, "reference")


def tuning(name: str) -> dict:
    """The tuning constants of a target (or template family) name: DEFAULT_TUNING with the row's overrides."""
    row = TARGETS.get(name)
    return {**DEFAULT_TUNING, **(row.tuning if row is not None else {})}


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
    """Best target the host can run: the first runnable name in PREFERENCE, else portable."""
    for name in PREFERENCE:
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
        raise ValueError(
            f"unknown codegen target {name!r}; choose one of {['native', *TARGETS, 'reference']}"
        )
    return TARGETS[name]
