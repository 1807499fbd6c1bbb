"""A tiny stderr progress bar (no dependency): `label [#####.....] 5/10 1.2s`.

Example:
    >>> bar = Progress("calibrate", total=3, enabled=False)
    >>> for i in range(3):
    ...     bar.step(i + 1)
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, enabled: bool = True, width: int = 30):
        self.label, self.total, self.enabled, self.width = label, total, enabled, width
        self.start = time.perf_counter()

    def step(self, done: int) -> None:
        if not self.enabled:
            return
        fill = int(self.width * done / max(self.total, 1))
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {done}/{self.total} "
                         f"{time.perf_counter() - self.start:.1f}s")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
