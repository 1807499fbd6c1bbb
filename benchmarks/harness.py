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

    def cell(self, digits: int = 1, scale: float = 1.0) -> str:
        """'median [q1-q3]' for a table, in us times `scale` (1e-3: ms)."""
        m, a, b = (v * scale for v in (self.median_us, self.q1_us, self.q3_us))
        return f"{m:.{digits}f} [{a:.{digits}f}-{b:.{digits}f}]"

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
    return {name: Stats.of(v) for name, v in samples(methods, rounds, min_sample_s, warmup, before).items()}


def samples(methods: dict[str, Callable[[], Any]], rounds: int = 21, min_sample_s: float = 0.002,
            warmup: int = 2, before: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """measure()'s raw seconds per call, one per round, to pool blocks measured at different times."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    calls = {name: 1 if before else _calls_per_sample(fn, min_sample_s) for name, fn in methods.items()}
    out: dict[str, list[float]] = {name: [] for name in methods}
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
            out[name].append((clock() - t0) / k)
    return out


def alternating(methods: dict[str, Callable[[], Any]], threads: int, loads: list[bool], blocks: int, rounds: int,
                torch_threads: bool = True, warmup: int = 1) -> dict[bool, dict]:
    """Blocks of interleaved rounds that alternate the load conditions (quiet / one core busy), so a change in
    the machine's other load hits both alike; per condition the pooled raw seconds and the Conditions.
    Returns {busy: {"samples": {method: [s, ...]}, "conditions": [Condition, ...]}}."""
    out = {busy: {"samples": {m: [] for m in methods}, "conditions": []} for busy in loads}
    for b in range(blocks):
        for busy in (loads if b % 2 == 0 else loads[::-1]):
            with condition(threads, busy, torch_threads) as cond:
                got = samples(methods, rounds=rounds, min_sample_s=0, warmup=warmup)
            out[busy]["conditions"].append(cond)
            for m, v in got.items():
                out[busy]["samples"][m] += v
    return out


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


def wait_policies(fxquant_pool: bool = True) -> dict:
    """torch's OpenMP wait policy (OMP_WAIT_POLICY) and fxquant's pool policy (fxquant_pool=False: a process
    without torch or fxquant, e.g. the CTranslate2 peer)."""
    out = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp default)"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
           "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "(unset)")}  # the fxquant CLI sets 0 when unset
    if not fxquant_pool:
        return out
    try:
        from fxquant.codegen.threadpool import wait_policy
        name, spin = wait_policy()
        out["fxquant pool"] = f"{name} (helpers spin {spin} us, then sleep)"
    except ImportError:  # an fxquant without the pool (e.g. an older tree measured for comparison)
        out["fxquant pool"] = "OpenMP (libgomp, same as torch)"
    return out


@contextmanager
def condition(threads: int, busy: bool, torch_threads: bool = True) -> Iterator[Condition]:
    """Set torch's (and so fxquant's) thread count, optionally busy one core, record the load average.
    torch_threads=False leaves torch alone (not even imported): for a peer that takes its thread count
    itself, e.g. CTranslate2's intra_threads."""
    if torch_threads:
        import torch
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
    with busy_core(busy):
        cond = Condition(threads, busy, load_average(), wait_policy=wait_policies(torch_threads))
        try:
            yield cond
        finally:
            cond.load_after = load_average()
            if torch_threads:
                torch.set_num_threads(old)


@dataclass
class Child:
    """A finished child process: wall seconds, exit code, output and its own peak RSS (ru_maxrss)."""

    seconds: float
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mib: float

    def result(self) -> Any:
        """The JSON object a worker printed with print_result(); RuntimeError with its stderr otherwise."""
        line = next((ln for ln in self.stdout.splitlines()[::-1] if ln.startswith(RESULT)), None)
        if self.returncode != 0 or line is None:
            raise RuntimeError(f"worker failed (exit {self.returncode}):\n{self.stderr[-3000:]}")
        return json.loads(line[len(RESULT):])


RESULT = "RESULT "


def print_result(obj: Any) -> None:
    """A worker's answer to its parent: one line on stdout (read by Child.result)."""
    print(RESULT + json.dumps(obj, default=_jsonable), flush=True)


def run_child(cmd: list[str], env: dict | None = None, timeout: float | None = None, cwd=None) -> Child:
    """Run cmd to completion; its wall time and its own peak RSS (os.wait4, not the max over all children).

    Example:
        >>> c = run_child([sys.executable, "-c", "print('RESULT 1')"])
        >>> c.result(), c.returncode, c.peak_rss_mib > 1
        (1, 0, True)
    """
    import tempfile
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True, cwd=cwd)
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Child(seconds, proc.returncode, out.read(), err.read(), usage.ru_maxrss / 1024)


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


def header(title: str, conditions: list[Condition],
           times: str = "Times are medians of interleaved rounds in us per call, [first-third quartile] beside them."
           ) -> str:
    """Markdown preamble: machine, wait policies, the load average of every condition and what times mean."""
    m = machine()
    lines = [f"# {title}", "", f"- CPU: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, Python {m['python']}; "
             f"{m['date']}", f"- Command: `{m['command']}` (this file is written by that script)"]
    if conditions:
        pol = conditions[0].wait_policy
        lines.append("- Wait policy (all methods): " + "; ".join(f"{k} = {v}" for k, v in pol.items()))
    lines.append("- The machine is shared with other jobs: 1-minute load average before -> after each block: " +
                 "; ".join(f"{c.label()}: {c.load_before:.1f} -> {c.load_after:.1f}" for c in conditions))
    lines.append(f"- {times}")
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
