"""Starting a server under test: a free port, and a subprocess that is ready when its /ready says 200."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], url: str, cwd: Path, seconds: float = 120) -> subprocess.Popen:
    """`cmd` in a subprocess (output discarded), returned once GET url/ready answers 200; RuntimeError if it exits
    or is not ready within `seconds` (and it is stopped)."""
    server = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > end or server.poll() is not None:
            server.terminate()
            raise RuntimeError(f"the server did not become ready: {' '.join(cmd)}")
        time.sleep(0.2)
