"""One fair timing harness for fxquant's benchmarks.

- Peers run at the same thread count (`torch.set_num_threads`, which fxquant's kernels follow too) and the
  same wait policy (OMP_WAIT_POLICY is read by torch's OpenMP and by fxquant's pool; set it before torch
  loads, e.g. `--wait-policy passive`).
- Everything is called the way a user calls it (modules, not raw kernels, unless a column says so).
- Interleaved rounds: each round times every method once, in a rotated order, so load from other processes
  hits every method alike; a sample repeats a fast call until it lasts >= `min_sample_s`.
- Medians with their spread (quartiles, min and max) and the number of samples.
- The 1-minute load average before and after each block of measurements, and the wait policy, thread count,
  CPU and versions, go into every results file, which the script that measured writes itself.
- `busy_core()` runs one busy-loop process (`sh -c 'while :; do :; done'`) for the "one core busy" runs and
  kills it (by its pid) at the end.

Example:
    >>> stats = measure({"sum": lambda: sum(range(100))}, rounds=5, min_sample_s=1e-4)
    >>> stats["sum"].n
    5
    >>> stats["sum"].median_us > 0
    True
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


@dataclass
class Stats:
    """Microseconds per call: median, quartiles, min, max over n samples."""

    median_us: float
    q1_us: float
    q3_us: float
    min_us: float
    max_us: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Stats":
        us = sorted(s * 1e6 for s in seconds)
        q = statistics.quantiles(us, n=4) if len(us) >= 2 else [us[0]] * 3
        return cls(statistics.median(us), q[0], q[2], us[0], us[-1], len(us))

    def cell(self, digits: int = 1) -> str:
        """'median [q1-q3]' for a table."""
        return f"{self.median_us:.{digits}f} [{self.q1_us:.{digits}f}-{self.q3_us:.{digits}f}]"

    @property
    def iqr_pct(self) -> float:
        return 100.0 * (self.q3_us - self.q1_us) / self.median_us if self.median_us else 0.0


def _calls_per_sample(fn: Callable[[], Any], min_sample_s: float, max_calls: int = 1000) -> int:
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return int(min(max_calls, max(1, min_sample_s / one)))


def measure(methods: dict[str, Callable[[], Any]], rounds: int = 21, min_sample_s: float = 0.002,
            warmup: int = 2, before: Callable[[], Any] | None = None) -> dict[str, Stats]:
    """Interleaved rounds of every method; returns per-method Stats of the time per call. before(), when
    given, runs untimed ahead of every call (e.g. evicting caches), and a sample is then one call."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    calls = {name: 1 if before else _calls_per_sample(fn, min_sample_s) for name, fn in methods.items()}
    samples: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    clock = time.perf_counter
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, k = methods[name], calls[name]
            if before is not None:
                before()
            t0 = clock()
            for _ in range(k):
                fn()
            samples[name].append((clock() - t0) / k)
    return {name: Stats.of(v) for name, v in samples.items()}


def load_average() -> float:
    return os.getloadavg()[0]


@contextmanager
def busy_core(enabled: bool = True) -> Iterator[int | None]:
    """One busy-loop process while the block runs (None when disabled); killed by its pid afterwards."""
    if not enabled:
        yield None
        return
    proc = subprocess.Popen(["sh", "-c", "while :; do :; done"], start_new_session=True)
    try:
        time.sleep(0.5)  # let the scheduler see it
        yield proc.pid
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@dataclass
class Condition:
    """What a block of measurements ran under."""

    threads: int
    busy: bool
    load_before: float
    load_after: float = float("nan")
    wait_policy: dict = field(default_factory=dict)

    def label(self) -> str:
        return f"{self.threads} thread{'s' if self.threads > 1 else ''}, {'one core busy' if self.busy else 'quiet'}"


def wait_policies() -> dict:
    """torch's OpenMP wait policy (OMP_WAIT_POLICY) and fxquant's pool policy."""
    out = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp default)"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)")}
    try:
        from fxquant.codegen.threadpool import wait_policy
        name, spin = wait_policy()
        out["fxquant pool"] = f"{name} (helpers spin {spin} us, then sleep)"
    except ImportError:  # an fxquant without the pool (e.g. an older tree measured for comparison)
        out["fxquant pool"] = "OpenMP (libgomp, same as torch)"
    return out


@contextmanager
def condition(threads: int, busy: bool) -> Iterator[Condition]:
    """Set torch's (and so fxquant's) thread count, optionally busy one core, record the load average."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    with busy_core(busy):
        cond = Condition(threads, busy, load_average(), wait_policy=wait_policies())
        try:
            yield cond
        finally:
            cond.load_after = load_average()
            torch.set_num_threads(old)


def machine() -> dict:
    """CPU, core count, versions and date."""
    import torch
    model = platform.processor() or "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="minutes"), "command": " ".join(sys.argv)}


def header(title: str, conditions: list[Condition]) -> str:
    """Markdown preamble: machine, wait policies and the load average of every condition."""
    m = machine()
    lines = [f"# {title}", "", f"- CPU: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, Python {m['python']}; "
             f"{m['date']}", f"- Command: `{m['command']}` (this file is written by that script)"]
    if conditions:
        pol = conditions[0].wait_policy
        lines.append("- Wait policy (all methods): " + "; ".join(f"{k} = {v}" for k, v in pol.items()))
    lines.append("- The machine is shared with other jobs: 1-minute load average before -> after each block: " +
                 "; ".join(f"{c.label()}: {c.load_before:.1f} -> {c.load_after:.1f}" for c in conditions))
    lines.append("- Times are medians of interleaved rounds in us per call, [first-third quartile] beside them.")
    return "\n".join(lines) + "\n"


def write_results(md_path: Path, text: str, data: Any) -> None:
    """The markdown table and the raw numbers (json beside it)."""
    md_path.write_text(text)
    md_path.with_suffix(".json").write_text(json.dumps(data, indent=1, default=_jsonable))
    print(f"wrote {md_path} and {md_path.with_suffix('.json').name}")


def _jsonable(obj):
    if isinstance(obj, (Stats, Condition)):
        return asdict(obj)
    return str(obj)
