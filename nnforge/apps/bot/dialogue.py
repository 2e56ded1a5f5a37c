"""The bot itself: understand a message, keep each conversation's state, answer, fall back, hand off.

    bot = Bot("runs/bot/example")
    bot.reply("s1", "where is my order?")   # {"route": "slot", "reply": "Could you give me your order number? ..."}
    bot.reply("s1", "it's 482913")          # {"route": "intent", "intent": "order_status", "reply": "Order 482913"}

Each message takes the first route that applies:
  slot      a slot was asked for and this message holds it (or the bot asks again, at most MAX_ASKS times)
  intent    the classifier's top probability reaches the calibrated threshold: the intent's answer, once every slot
            its template needs is known (from this message, or given earlier in the session), else the question
            for the first missing one
  faq       the best FAQ passage scores at least faq_threshold
  handoff   a polite message and a ticket with the conversation (also for intents whose action is handoff)
Sessions end EXPIRE_S after their last message (a pending question is then forgotten); at most MAX_SESSIONS are
kept, the least recently active dropped first.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnforge import api
from nnforge.apps.bot.faq import FaqIndex
from nnforge.apps.bot.intents import IntentSpec, read_intents
from nnforge.apps.bot.records import ConversationLog, Tickets

MAX_MESSAGE_CHARS = 2000  # longer is not a chat message; the classifier reads at most its max_len tokens anyway
MAX_ASKS = 2  # a slot asked for this many times without an answer: a person takes over
EXPIRE_S = 900.0  # 15 minutes of silence ends a session
MAX_SESSIONS = 10_000
MAX_TURNS = 40  # a session keeps its last 40 turns (what a ticket shows)


class MessageError(ValueError):
    """A message the bot cannot take; the text says what was expected, `status` is the HTTP answer (400, 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_message(message) -> str:
    if not isinstance(message, str):
        raise MessageError(f"message must be text, got {type(message).__name__}")
    text = message.strip()
    if not text:
        raise MessageError("the message is empty; type a question, e.g. 'where is my order?'")
    if len(text) > MAX_MESSAGE_CHARS:
        raise MessageError(f"the message is {len(text)} characters long; the limit is {MAX_MESSAGE_CHARS}", 413)
    return text


@dataclass
class Session:
    id: str
    last: float
    turns: deque = field(default_factory=lambda: deque(maxlen=MAX_TURNS))
    slots: dict[str, str] = field(default_factory=dict)
    pending: tuple[str, str] | None = None  # (intent, slot) asked for
    asks: int = 0


@dataclass
class Understood:
    """What one message says on its own, before any session state: the evaluation scores this."""
    intent: str  # the classifier's top intent, accepted or not
    confidence: float
    accepted: bool
    faq_score: float = 0.0
    passage: dict | None = None

    @property
    def route(self) -> str:
        if self.accepted:
            return "intent"
        return "faq" if self.passage is not None else "handoff"


class Bot:
    def __init__(self, folder: str | Path, *, tickets: str | Path | None = None, log: str | Path | None = None,
                 expire_s: float = EXPIRE_S, max_sessions: int = MAX_SESSIONS, clock=time.time,
                 device: str = "cpu"):
        self.folder = Path(folder)
        card_path = self.folder / "bot.json"
        if not card_path.is_file():
            raise FileNotFoundError(f"{self.folder}: no bot.json; train a bot with `nnforge app bot train`")
        self.card = json.loads(card_path.read_text())
        self.spec: IntentSpec = read_intents(self.folder / "intents.yaml")
        self.model = api.load(self.folder / self.card["model"], device=device)
        self.classes = self.model.classes
        self.threshold = float(self.card["threshold"])
        self.faq_threshold = float(self.card.get("faq_threshold", 1.0))
        self.faq = None
        if self.card.get("faq"):
            passages = json.loads((self.folder / "faq.json").read_text())
            vectors = np.load(self.folder / "faq_vectors.npy", allow_pickle=False)
            self.faq = FaqIndex(passages, vectors)
        self.tickets = Tickets(tickets or self.folder / "tickets.db")
        self.log = ConversationLog(log) if log else None
        self.expire_s, self.max_sessions, self.clock = expire_s, max_sessions, clock
        self.sessions: OrderedDict[str, Session] = OrderedDict()

    @property
    def name(self) -> str:
        return self.spec.bot["name"]

    # ---------------------------------------------------------------------------------------------------------
    # understanding, message by message

    def understand(self, messages: list[str]) -> list[Understood]:
        probs = self.model.predict_proba(messages)  # (N, K)
        top = probs.argmax(1)
        out = [Understood(self.classes[k], float(p[k]), bool(p[k] >= self.threshold)) for k, p in zip(top, probs,
                                                                                                     strict=True)]
        unsure = [i for i, u in enumerate(out) if not u.accepted]
        if unsure and self.faq is not None:
            vectors = self.model.embed([messages[i] for i in unsure])  # (M, D): the same features the head reads
            for i, v in zip(unsure, vectors, strict=True):
                score, passage = self.faq.search(messages[i], v, k=1)[0]
                out[i].faq_score = score
                if score >= self.faq_threshold:
                    out[i].passage = passage
        return out

    # ---------------------------------------------------------------------------------------------------------
    # conversations

    def session(self, session_id: str) -> tuple[Session, bool]:
        """The session (a new one if unknown or expired; True when it had expired)."""
        now = self.clock()
        s, expired = self.sessions.pop(session_id, None), False
        if s is not None and now - s.last > self.expire_s:
            s, expired = None, True
        while self.sessions:  # the front is the least recently active: drop the expired ones
            first = next(iter(self.sessions.values()))
            if now - first.last <= self.expire_s:
                break
            self.sessions.popitem(last=False)
        if s is None:
            s = Session(session_id, now)
        s.last = now
        self.sessions[session_id] = s
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return s, expired

    def reply(self, session_id: str, message) -> dict:
        text = check_message(message)
        s, expired = self.session(session_id)
        # the pending-slot check also sees a session that expired a moment ago as fresh: nothing is pending
        s.turns.append({"role": "user", "text": text})
        u = self.understand([text])[0]
        out = self._route(s, text, u)
        s.turns.append({"role": "bot", "text": out["reply"]})
        out.update(session=s.id, confidence=round(u.confidence, 4), top_intent=u.intent,
                   expired_session=expired, pending=s.pending[1] if s.pending else None)
        if self.log is not None:
            self.log.write({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "session": s.id,
                            "message": text, "route": out["route"], "intent": out.get("intent"),
                            "top_intent": u.intent, "confidence": out["confidence"], "reply": out["reply"],
                            "misunderstood": out["route"] in ("faq", "handoff") and out.get("intent") is None})
        return out

    def _route(self, s: Session, text: str, u: Understood) -> dict:
        if s.pending is not None:
            intent, slot = s.pending
            value = self.spec.slots[slot].find(text)
            if value is not None:
                s.slots[slot], s.pending, s.asks = value, None, 0
                return self._answer(s, intent, text)
            if not (u.accepted and u.intent != intent):  # not a change of subject: ask again
                s.asks += 1
                if s.asks > MAX_ASKS:
                    return self._handoff(s, f"no {slot} after {MAX_ASKS} questions")
                return {"route": "slot", "intent": intent,
                        "reply": f"{self.spec.bot['not_understood']} {self.spec.slots[slot].ask}"}
            s.pending, s.asks = None, 0
        if u.accepted:
            return self._answer(s, u.intent, text)
        if u.passage is not None:
            p = u.passage
            return {"route": "faq", "intent": None, "reply": f"{self.spec.bot['faq_intro']} {p['text']}",
                    "source": {"doc": p["doc"], "title": p["title"], "score": round(u.faq_score, 4)}}
        return self._handoff(s, "not understood")

    def _answer(self, s: Session, name: str, text: str) -> dict:
        intent = self.spec.intents[name]
        if intent.action == "handoff":
            return self._handoff(s, f"asked for a person ({name})", name)
        for slot in intent.slots:  # a value in this message wins over one given earlier
            value = self.spec.slots[slot].find(text)
            if value is not None:
                s.slots[slot] = value
        missing = [slot for slot in intent.slots if slot not in s.slots]
        if missing:
            s.pending, s.asks = (name, missing[0]), 0
            return {"route": "slot", "intent": name, "reply": self.spec.slots[missing[0]].ask}
        values = {k: s.slots[k] for k in intent.slots}
        reply = self.spec.fill(intent.answer, values)
        if intent.follow_up:
            reply += " " + self.spec.fill(intent.follow_up, values)
        return {"route": "intent", "intent": name, "reply": reply, "slots": values}

    def _handoff(self, s: Session, reason: str, intent: str | None = None) -> dict:
        ticket = self.tickets.open(s.id, reason, list(s.turns))
        s.pending, s.asks = None, 0
        return {"route": "handoff", "intent": intent, "reason": reason, "ticket": ticket,
                "reply": self.spec.bot["handoff"].format(ticket=ticket)}

    def close(self) -> None:
        self.tickets.close()
