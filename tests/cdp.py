"""A small Chrome DevTools Protocol client for tests: headless Chromium, one page, evaluate, real key events.

    with Browser(Path("/usr/bin/chromium"), tmp_path / "profile") as b:
        page = b.open("http://127.0.0.1:8001/")
        page.wait_for("document.body.dataset.shown === '1'", what="the first item")
        page.press("2")
        page.problems()          # console errors, uncaught exceptions, failed loads, requests that left 127.0.0.1

Chromium starts with --remote-debugging-port=0 and writes the port it chose to PROFILE/DevToolsActivePort; the
client speaks to the browser endpoint over one websocket (`websockets`' sync client) and to each page through a
flattened session. Every wait has a deadline and says what it waited for; the browser is always killed on exit.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

from websockets.sync.client import connect

START_S = 20.0  # Chromium's start on a busy 2-core machine
CALL_S = 10.0  # one protocol call

# what Input.dispatchKeyEvent needs to produce the same keydown a keyboard does
NAMED_KEYS = {"Enter": ("Enter", 13, "\r"), "Backspace": ("Backspace", 8, ""), "ArrowLeft": ("ArrowLeft", 37, ""),
              "ArrowRight": ("ArrowRight", 39, ""), "Escape": ("Escape", 27, "")}


class CDPError(RuntimeError):
    pass


class Browser:
    def __init__(self, exe: Path, profile: Path, extra_args: tuple[str, ...] = ()):
        self.exe, self.profile, self.extra_args = exe, profile, extra_args
        self.proc: subprocess.Popen | None = None
        self.ws = None
        self._id = 0
        self.events: list[dict] = []  # every event received, in order (each has "method", "params", "sessionId")

    def __enter__(self) -> Browser:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.profile.mkdir(parents=True, exist_ok=True)
        self.log = self.profile.parent / f"{self.profile.name}-chromium.log"
        cmd = [str(self.exe), "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
               f"--user-data-dir={self.profile}", "--no-first-run", "--no-default-browser-check", "--disable-quic",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-extensions", "--disable-default-apps", *self.extra_args, "about:blank"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_S
        while True:
            lines = port_file.read_text().split("\n") if port_file.is_file() else []
            if len(lines) >= 2 and lines[0].strip().isdigit() and lines[1].strip():
                break
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with {self.proc.returncode} before it listened: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise CDPError(f"chromium wrote no {port_file} within {START_S:.0f}s: {self._log_tail()}")
            time.sleep(0.05)
        url = f"ws://127.0.0.1:{lines[0].strip()}{lines[1].strip()}"
        self._ws_cm = connect(url, proxy=None, max_size=None, open_timeout=CALL_S, ping_interval=None)
        self.ws = self._ws_cm.__enter__()  # websockets wants connect() entered as a context manager

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def close(self) -> None:
        if self.ws is not None:
            try:
                self._ws_cm.__exit__(None, None, None)
            except Exception:  # the browser may be gone already
                pass
            self.ws = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = CALL_S) -> dict:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError(f"{method}: no answer within {timeout:.0f}s")
            try:
                reply = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                continue
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def pump(self, seconds: float) -> None:
        """Read the events that arrive within `seconds` (between calls nothing reads the socket)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                reply = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                return
            if "method" in reply:
                self.events.append(reply)

    def open(self, url: str) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.call(f"{domain}.enable")
        page.call("Page.navigate", {"url": url})
        return page


class Page:
    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def call(self, method: str, params: dict | None = None, timeout: float = CALL_S) -> dict:
        return self.browser.send(method, params, self.session, timeout)

    def events(self, method: str) -> list[dict]:
        return [e["params"] for e in self.browser.events
                if e.get("sessionId") == self.session and e["method"] == method]

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise CDPError(f"{expression}: {r['exceptionDetails'].get('exception', r['exceptionDetails'])}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, what: str = "", state: str = "") -> object:
        """Poll a JS expression until it is truthy; on timeout fail with `what` and the page's `state` expression."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except CDPError as err:  # e.g. no document.body yet while the page loads
                value, seen = None, err
            else:
                seen = value
            if value:
                return value
            if time.monotonic() > deadline:
                try:
                    seen = self.evaluate(state) if state else seen
                except CDPError as err:
                    seen = err
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or expression}; page state: "
                                     f"{seen!r}; problems: {self.problems()}")
            self.browser.pump(0.05)

    def press(self, key: str) -> None:
        """A real key press (keyDown with its text, then keyUp), as a keyboard sends it."""
        if key in NAMED_KEYS:
            code, vk, text = NAMED_KEYS[key]
        elif len(key) == 1:
            code = f"Digit{key}" if key.isdigit() else f"Key{key.upper()}"
            vk, text = ord(key.upper()), key
        else:
            raise ValueError(f"key {key!r}: a single character or one of {', '.join(NAMED_KEYS)}")
        down = {"type": "keyDown", "key": key, "code": code, "windowsVirtualKeyCode": vk,
                "nativeVirtualKeyCode": vk}
        if text:
            down["text"] = down["unmodifiedText"] = text
        self.call("Input.dispatchKeyEvent", down)
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": vk,
                                             "nativeVirtualKeyCode": vk})

    def requests(self) -> list[str]:
        return [e["request"]["url"] for e in self.events("Network.requestWillBeSent")]

    def problems(self, allowed_host: str = "127.0.0.1") -> list[str]:
        """Console errors, uncaught exceptions, failed loads and requests to any host but `allowed_host`."""
        out = [f"console.{e['type']}: {[a.get('value', a.get('description')) for a in e.get('args', [])]}"
               for e in self.events("Runtime.consoleAPICalled") if e["type"] in ("error", "assert")]
        out += [f"uncaught: {e['exceptionDetails'].get('exception', {}).get('description') or e['exceptionDetails']}"
                for e in self.events("Runtime.exceptionThrown")]
        out += [f"log {e['entry'].get('source')}: {e['entry'].get('text')} {e['entry'].get('url', '')}"
                for e in self.events("Log.entryAdded") if e["entry"]["level"] == "error"]
        out += [f"failed load: {e.get('errorText')} {e.get('blockedReason', '')}"
                for e in self.events("Network.loadingFailed") if not e.get("canceled")]
        for url in self.requests():
            inner = url[len("blob:"):] if url.startswith("blob:") else url
            if url.startswith("data:") or urlsplit(inner).hostname != allowed_host:
                out.append(f"request left {allowed_host}: {url[:200]}")
        return out
