"""What the bot writes down: hand-off tickets (SQLite or JSON Lines) and, when asked, the conversations.

    tickets = Tickets(Path("runs/bot/example/tickets.db"))        # or tickets.jsonl
    tickets.open("session-1", "not understood", [{"role": "user", "text": "..."}])   # -> "T-20250102-3fa9c1"
    log = ConversationLog(Path("conversations.jsonl"))             # opt-in: nothing is logged without it
    log.write({"session": "...", "message": "...", "route": "handoff", ...})

A ticket is a record a person will act on, so every one is kept. The conversation log is for the continuous-
learning loop (misunderstood messages are marked) and is bounded: past MAX_LOG_BYTES it moves to FILE.1, replacing
the previous one, so at most twice that is ever on disk.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path

MAX_LOG_BYTES = 50 * 2**20


class Tickets:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.jsonl = self.path.suffix.lower() in (".jsonl", ".ndjson")
        if not self.jsonl:
            self.db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS tickets (id TEXT PRIMARY KEY, created TEXT NOT NULL, "
                            "session TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL, "
                            "conversation TEXT NOT NULL)")
            self.db.commit()

    def open(self, session: str, reason: str, conversation: list[dict]) -> str:
        now = time.gmtime()
        ticket = f"T-{time.strftime('%Y%m%d', now)}-{secrets.token_hex(3)}"
        last = next((t["text"] for t in reversed(conversation) if t["role"] == "user"), "")
        row = {"id": ticket, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", now), "session": session,
               "reason": reason, "message": last, "conversation": conversation}
        with self.lock:
            if self.jsonl:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                self.db.execute("INSERT INTO tickets VALUES (?, ?, ?, ?, ?, ?)",
                                (ticket, row["created"], session, reason, last,
                                 json.dumps(conversation, ensure_ascii=False)))
                self.db.commit()
        return ticket

    def all(self) -> list[dict]:
        with self.lock:
            if self.jsonl:
                if not self.path.exists():
                    return []
                return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]
            rows = self.db.execute("SELECT id, created, session, reason, message, conversation FROM tickets "
                                   "ORDER BY created, id").fetchall()
        return [{"id": r[0], "created": r[1], "session": r[2], "reason": r[3], "message": r[4],
                 "conversation": json.loads(r[5])} for r in rows]

    def close(self) -> None:
        if not self.jsonl:
            self.db.close()


class ConversationLog:
    def __init__(self, path: str | Path, max_bytes: int = MAX_LOG_BYTES):
        self.path, self.max_bytes = Path(path), max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def write(self, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        with self.lock:
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self.path.replace(self.path.with_name(self.path.name + ".1"))
            with self.path.open("ab") as f:
                f.write(line)
