"""Where alerts go: stdout, a JSON Lines file, a webhook. A webhook that is down never stops or slows the monitor.

    sinks = Sinks(jsonl=Path("alerts.jsonl"), webhook="http://127.0.0.1:9000/hook")
    sinks.send(alert)       # returns at once; the webhook posts on its own thread
    sinks.close()           # waits up to drain_s for the webhook to finish, then reports what was not delivered

The webhook gets each alert as a JSON POST. A connection error, a timeout, a 429 or a 5xx is retried with
exponential backoff (backoff_s, doubling, at most MAX_BACKOFF_S apart) up to `retries` times; any other 4xx means
the receiver refuses it, so it is not retried. Alerts wait in a bounded queue (MAX_QUEUE): when the receiver has
been down long enough to fill it, the oldest are dropped and counted, so memory stays bounded.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from urllib.parse import urlparse

MAX_QUEUE = 1000
MAX_BACKOFF_S = 30.0


def check_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"--alert-webhook {url!r}: expected an http:// or https:// URL")
    return url


def one_line(alert: dict) -> str:
    return f"ALERT {alert['window'][0]} [{alert['topic']}] {alert['kind']}: {alert['message']}"


class Webhook:
    def __init__(self, url: str, retries: int = 5, backoff_s: float = 0.5, timeout_s: float = 5.0):
        self.url, self.retries, self.backoff_s, self.timeout_s = check_url(url), retries, backoff_s, timeout_s
        self.queue: deque = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.abandon = False  # set by close() once its drain time is up: pending retries give up
        self.delivered = self.failed = self.dropped = 0
        self.last_error = ""
        self.thread = threading.Thread(target=self._loop, daemon=True, name="webhook")
        self.thread.start()

    def send(self, alert: dict) -> None:
        with self.cond:
            if len(self.queue) >= MAX_QUEUE:
                self.queue.popleft()
                self.dropped += 1
            self.queue.append(alert)
            self.cond.notify()

    def _post(self, body: bytes) -> tuple[bool, bool, str]:
        """(delivered, worth retrying, what happened)."""
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "nnforge-monitor"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as res:
                return True, False, f"HTTP {res.status}"
        except urllib.error.HTTPError as err:
            return False, err.code == 429 or err.code >= 500, f"HTTP {err.code}"
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            return False, True, str(getattr(err, "reason", err))

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    return
                alert = self.queue.popleft()
            body = json.dumps(alert, ensure_ascii=False).encode()
            for attempt in range(self.retries + 1):
                ok, again, what = self._post(body)
                if ok:
                    self.delivered += 1
                    break
                self.last_error = what
                if not again or attempt == self.retries:
                    self.failed += 1
                    print(f"monitor: webhook {self.url} failed ({what}) after {attempt + 1} attempt(s); the alert is "
                          "still in the JSONL file and the state", file=sys.stderr, flush=True)
                    break
                with self.cond:  # a closing monitor cuts the backoff short rather than wait it out
                    if self.cond.wait_for(lambda: self.closing and self.abandon,
                                          min(MAX_BACKOFF_S, self.backoff_s * 2 ** attempt)):
                        self.failed += 1
                        break

    def close(self, drain_s: float) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join(drain_s)
        with self.cond:
            self.abandon = True
            left = len(self.queue)
            self.queue.clear()
            self.cond.notify_all()
        self.thread.join(self.timeout_s + 1)
        if left or self.failed or self.dropped:
            print(f"monitor: webhook: {self.delivered} delivered, {self.failed} failed, {self.dropped + left} not "
                  f"sent{f' (last error: {self.last_error})' if self.last_error else ''}", file=sys.stderr,
                  flush=True)


class Sinks:
    def __init__(self, stdout: bool = True, jsonl: str | Path | None = None, webhook: str | None = None,
                 retries: int = 5, backoff_s: float = 0.5):
        self.stdout = stdout
        self.jsonl = Path(jsonl) if jsonl else None
        if self.jsonl:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.webhook = Webhook(webhook, retries, backoff_s) if webhook else None
        self.sent = 0

    def send(self, alert: dict) -> None:
        self.sent += 1
        if self.stdout:
            print(one_line(alert), flush=True)
        if self.jsonl:
            with self.jsonl.open("a", encoding="utf-8") as f:
                f.write(json.dumps(alert, ensure_ascii=False) + "\n")
        if self.webhook:
            self.webhook.send(alert)

    def close(self, drain_s: float = 10.0) -> None:
        if self.webhook:
            t0 = time.monotonic()
            self.webhook.close(drain_s)
            if time.monotonic() - t0 > 1:
                print(f"monitor: waited {time.monotonic() - t0:.0f} s for the webhook", file=sys.stderr, flush=True)
