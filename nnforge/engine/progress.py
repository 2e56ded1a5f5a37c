"""Progress for long work: a tqdm bar on a terminal, a line every `every_s` seconds in logs (with rate and ETA)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, every_s: float = 30.0,
                 quiet: bool = False):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet  # e.g. every process but rank 0 of a distributed run: one voice is enough
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, mininterval=0.5,
                        leave=False) if self.tty else None
        self.t0 = self.last = time.perf_counter()
        self.start_n, self.every_s, self.postfix = initial, every_s, {}

    def update(self, k: int = 1, **postfix) -> None:
        self.n += k
        if postfix:
            self.postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(k)
            return
        now = time.perf_counter()
        if not self.quiet and now - self.last >= self.every_s:
            self.last = now
            rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.n}/{self.total} {self.unit} {rate:.1f} {self.unit}/s ETA {eta:.0f}s {extra}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
