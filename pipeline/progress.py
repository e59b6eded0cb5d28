"""Progress lines for long driver-side loops (evaluation, embedding export)."""

from __future__ import annotations

import time

PROGRESS_EVERY_S = 15.0


class Progress:
    """Prints `what: done/total (rate/s)` at most every PROGRESS_EVERY_S seconds: long work shows
    it is moving, a short evaluation prints nothing."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done = what, total, 0
        self.start = self.last = time.perf_counter()

    def add(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(f"  {self.what}: {self.done}/{self.total} ({self.done / (now - self.start):.1f}/s)", flush=True)
