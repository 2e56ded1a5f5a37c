"""The customer-service bot (nnforge app bot) on its shipped example: trained, served on 127.0.0.1, driven over HTTP,
from the terminal and through its chat page in a real headless Chromium.

    .venv/bin/pytest tests/test_apps_bot.py -q

The bot under test is trained once with `fasttext` (seconds) on the shipped online-shop intents and FAQ; the
default model (MiniLM, fine-tuned) is trained once too, for a single epoch, by the last test. The messages the
tests send are chosen from the bot's own training split, the FAQ and plain nonsense, so what they check (the route
taken, the template, the slot, the passage, the ticket) does not depend on how well a few epochs generalise.
Nothing waits on a sleep: every wait polls for its condition up to DEADLINE.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import DEADLINE, free_port, wait_for

from nnforge.apps._yaml import AppFileError
from nnforge.apps.bot import EXAMPLE
from nnforge.apps.bot.dialogue import Bot
from nnforge.apps.bot.intents import read_intents

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
NONSENSE = "blorf zizzle quux wibblewomp"
FAQ_QUESTION = "Can I wash a wool throw in the machine?"


def cli(*args: str, input: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnforge.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, input=input, timeout=timeout)




# ---------------------------------------------------------------------------------------------------------------
# the intents file is checked before anything trains


GOOD = """\
slots:
  order_id: {pattern: '([0-9]{6})', ask: "Your order number?"}
intents:
  hello:
    examples: [hi, hello, hey there]
    answer: "Hello!"
  where:
    examples: [where is my order, track my parcel, has it shipped]
    answer: "Order {order_id} is on its way."
"""


@pytest.mark.parametrize("change, line, words", [
    (("    answer: \"Hello!\"", "    answer: \"Hello!\"\n    colour: blue"), 7, "unknown key 'colour'"),
    (("    examples: [hi, hello, hey there]", "    examples: []"), 5, "has 0 example(s)"),
    (("Order {order_id} is", "Order {parcel} is"), 9, "unknown slot 'parcel'"),
    (("  order_id: {pattern: '([0-9]{6})'", "  order_id: {pattern: '([0-9]{6}'"), 2, "not a valid regular expr"),
    (("    examples: [where is my order,", "    examples: [hello, where is my order,"), 8, "also an example of"),
    (("intents:\n", "intents:\n  hello:\n    examples: [a, b, c]\n    answer: x\n"), 7, "repeats the one on line 4"),
])
def test_a_bad_intents_file_is_refused_with_its_line(tmp_path, change, line, words):
    path = tmp_path / "intents.yaml"
    path.write_text(GOOD)
    read_intents(path)  # the file as written is fine
    path.write_text(GOOD.replace(*change))
    with pytest.raises(AppFileError) as err:
        read_intents(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and words in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_the_command_line_refuses_a_bad_file_in_one_line_and_trains_nothing(tmp_path):
    path = tmp_path / "intents.yaml"
    path.write_text(GOOD.replace("    answer: \"Hello!\"", "    answer: \"Hello!\"\n    colour: blue"))
    res = cli("app", "bot", "train", "--intents", str(path), "--out", str(tmp_path / "runs"), timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == (f"error: {path}:7: unknown key 'colour' in intents/hello; expected one of: "
                                  "examples (utterances of this intent); answer (the reply, a template with {slot} "
                                  "fields); follow_up (a sentence added after the answer); action (answer "
                                  "(default) or handoff)")
    assert not (tmp_path / "runs").exists()


def test_the_shipped_example_is_a_full_shop():
    spec = read_intents(EXAMPLE / "intents.yaml")
    assert len(spec.intents) >= 15 and all(len(i.examples) >= 10 for i in spec.intents.values())
    chinese = [e for i in spec.intents.values() for e in i.examples if any("\u4e00" <= c <= "\u9fff" for c in e)]
    assert len(chinese) >= 5
    assert len(list((EXAMPLE / "faq").glob("*.md"))) >= 5 and spec.out_of_scope


# ---------------------------------------------------------------------------------------------------------------
# a trained bot


@pytest.fixture(scope="module")
def bot_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bot")
    res = cli("app", "bot", "train", "--example", "--model", "fasttext", "--epochs", "12", "--lr", "0.05", "--out",
              str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    folder = Path(res.stdout.strip().splitlines()[-1])
    assert folder == out / "bot" / "example"
    return folder


def trained_example(folder: Path, intent: str, digits: bool = False) -> str:
    """An utterance of `intent` the classifier was trained on (from the bot's own split)."""
    with (folder / "data" / "train.csv").open(encoding="utf-8") as f:
        rows = [r["text"] for r in csv.DictReader(f) if r["label"] == intent]
    picks = [t for t in rows if any(c.isdigit() for c in t) == digits and t.isascii()]
    assert picks, f"no training example of {intent}"
    return picks[0]


def test_training_writes_a_calibrated_bot_folder(bot_dir):
    card = json.loads((bot_dir / "bot.json").read_text())
    cal = card["calibration"]
    assert 0 < card["threshold"] < 1 and cal["method"] == "youden"
    assert cal["n_in_scope"] >= 19 and cal["n_out_of_scope"] == 20
    assert 0 <= cal["false_accept"] <= 1 and 0 <= cal["false_reject"] <= 1
    assert (bot_dir / "text" / "intents" / "checkpoints" / "best.safetensors").is_file()
    passages = json.loads((bot_dir / "faq.json").read_text())
    assert len(passages) >= 20 and card["faq"] and card["faq_threshold"] >= 0.3


@pytest.fixture(scope="module")
def server(bot_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nnforge.cli", "app", "bot", "serve", str(bot_dir), "--port",
                             str(port), "--log-conversations", str(logs / "chats.jsonl"), "--timeout",
                             str(DEADLINE)], cwd=ROOT, env=ENV, stdout=(logs / "out.log").open("w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            pytest.fail(f"the bot server exited: {(logs / 'out.log').read_text()}")
        try:
            return httpx.get(url + "/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, "the bot server to answer /ready")
    yield {"url": url, "logs": logs, "proc": proc}
    proc.send_signal(signal.SIGTERM)
    proc.wait(DEADLINE)


def chat(server, session: str, message) -> httpx.Response:
    return httpx.post(server["url"] + "/v1/chat", json={"session": session, "message": message}, timeout=DEADLINE)


def test_an_in_scope_question_gets_its_template(server, bot_dir):
    spec = read_intents(bot_dir / "intents.yaml")
    r = chat(server, "pay-1", trained_example(bot_dir, "payment_methods"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["route"], body["intent"]) == ("intent", "payment_methods")
    assert body["reply"] == spec.intents["payment_methods"].answer


def test_a_slot_is_asked_for_and_filled_on_the_next_turn(server, bot_dir):
    spec = read_intents(bot_dir / "intents.yaml")
    first = chat(server, "order-1", trained_example(bot_dir, "order_status")).json()
    assert (first["route"], first["intent"], first["pending"]) == ("slot", "order_status", "order_id")
    assert first["reply"] == spec.slots["order_id"].ask
    second = chat(server, "order-1", "sure, it's 482913").json()
    assert (second["route"], second["intent"], second["pending"]) == ("intent", "order_status", None)
    assert second["slots"] == {"order_id": "482913"}
    want = spec.intents["order_status"]
    assert second["reply"] == (want.answer + " " + want.follow_up).format(order_id="482913")
    # another session knows nothing of it
    other = chat(server, "order-2", "sure, it's 482913").json()
    assert other["route"] != "intent" or other["intent"] != "order_status"


def test_a_question_no_intent_covers_is_answered_from_the_faq(server):
    body = chat(server, "faq-1", FAQ_QUESTION).json()
    assert body["route"] == "faq", body
    assert body["source"]["doc"] == "care.md" and body["source"]["title"] == "Wool throws and knitwear"
    assert "wool programme at 30°C" in body["reply"]


def test_nonsense_is_handed_off_with_a_ticket_holding_the_conversation(server, bot_dir):
    chat(server, "lost-1", trained_example(bot_dir, "greeting"))
    body = chat(server, "lost-1", NONSENSE).json()
    assert body["route"] == "handoff" and body["ticket"].startswith("T-"), body
    assert body["ticket"] in body["reply"]

    def ticket():
        with sqlite3.connect(bot_dir / "tickets.db") as db:
            return db.execute("SELECT session, reason, message, conversation FROM tickets WHERE id = ?",
                              (body["ticket"],)).fetchone()

    session, reason, message, conversation = wait_for(ticket, "the ticket in tickets.db")
    turns = json.loads(conversation)
    assert (session, reason, message) == ("lost-1", "not understood", NONSENSE)
    assert [t["role"] for t in turns] == ["user", "bot", "user"] and turns[-1]["text"] == NONSENSE


def test_conversations_are_logged_when_asked_and_misunderstood_turns_marked(server):
    chat(server, "log-1", NONSENSE)
    log = server["logs"] / "chats.jsonl"

    def logged():
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [r for r in rows if r["session"] == "log-1"]

    row = wait_for(logged, "the turn in the conversation log")[0]
    assert row["message"] == NONSENSE and row["route"] == "handoff" and row["misunderstood"] is True


@pytest.mark.parametrize("payload, status, words", [
    ({"session": "bad-1", "message": ""}, 400, "empty"),
    ({"session": "bad-1", "message": "   "}, 400, "empty"),
    ({"session": "bad-1", "message": "x" * 5000}, 413, "limit is 2000"),
    ({"session": "bad-1", "message": "é" * 100_000}, 413, "over the limit"),
    ({"session": "bad-1", "message": 42}, 400, "must be text"),
    ({"session": "bad 1!", "message": "hi"}, 400, "session must be"),
    ({"session": "bad-1"}, 400, "expected a JSON object"),
    ({"session": "bad-1", "message": "hi", "extra": 1}, 400, "unknown field"),
    ([1, 2], 400, "expected a JSON object"),
])
def test_bad_messages_get_a_clear_4xx_never_a_500(server, payload, status, words):
    r = httpx.post(server["url"] + "/v1/chat", json=payload, timeout=DEADLINE)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_bodies_that_are_not_json_get_a_4xx(server):
    url = server["url"] + "/v1/chat"
    assert httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert httpx.post(url, content=b"hello", headers={"content-type": "text/plain"}).status_code == 415
    assert httpx.post(url, content=b"\xff\xfe", headers={"content-type": "application/json"}).status_code == 400
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    metrics = httpx.get(server["url"] + "/metrics").text
    assert 'nnforge_bot_requests_total{status="400"}' in metrics and "nnforge_bot_chat_seconds_bucket" in metrics


def test_a_session_expires_and_forgets_what_it_was_asking(bot_dir, tmp_path):
    now = [1000.0]
    bot = Bot(bot_dir, tickets=tmp_path / "tickets.jsonl", expire_s=60, clock=lambda: now[0])
    try:
        first = bot.reply("s", trained_example(bot_dir, "order_status"))
        assert first["pending"] == "order_id"
        now[0] += 61
        later = bot.reply("s", "482913")
        assert later["expired_session"] is True and later["intent"] != "order_status"
        bot.reply("t", trained_example(bot_dir, "order_status"))
        now[0] += 30  # within the limit: still pending
        assert bot.reply("t", "482913")["intent"] == "order_status"
        now[0] += 1000  # the next message drops every expired session
        bot.reply("u", "hello")
        assert list(bot.sessions) == ["u"]
    finally:
        bot.close()


def test_a_slot_never_given_ends_in_a_handoff(bot_dir, tmp_path):
    bot = Bot(bot_dir, tickets=tmp_path / "tickets.jsonl")
    try:
        assert bot.reply("s", trained_example(bot_dir, "order_status"))["route"] == "slot"
        routes = [bot.reply("s", NONSENSE)["route"] for _ in range(3)]
        assert routes == ["slot", "slot", "handoff"]
        tickets = [json.loads(line) for line in (tmp_path / "tickets.jsonl").read_text().splitlines()]
        assert len(tickets) == 1 and tickets[0]["reason"].startswith("no order_id")
    finally:
        bot.close()


def test_terminal_chat_answers_line_by_line(bot_dir):
    res = cli("app", "bot", "chat", str(bot_dir), "--json",
              input=f"{trained_example(bot_dir, 'order_status')}\n482913\n\n{FAQ_QUESTION}\nquit\n", timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("Larkspur Lane help: Hello")
    answers = [json.loads(line) for line in lines[1:] if line.startswith("{")]
    assert [a["route"] for a in answers] == ["slot", "intent", "faq"]
    assert "(the message is empty" in res.stdout


def test_evaluate_reports_accuracy_out_of_scope_and_rates(bot_dir):
    res = cli("app", "bot", "evaluate", str(bot_dir), timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads((bot_dir / "eval.json").read_text())
    assert report["n"] == 91 and report["n_faq"] == 18 and report["n_out_of_scope"] == 15
    for key in ("intent_accuracy", "top1_accuracy", "fallback_rate", "handoff_rate"):
        assert 0 <= report[key] <= 1
    assert report["intent_accuracy"] > 0.3  # far above chance (1 in 19) even for the quick model
    assert set(report["out_of_scope"]) >= {"precision", "recall", "f1", "false_accept", "false_reject"}
    assert "intent accuracy" in res.stdout and "hand-off rate" in res.stdout
    bad = cli("app", "bot", "evaluate", str(bot_dir), "--data", str(ROOT / "pyproject.toml"), timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# the chat page in a real browser, over the Chrome DevTools protocol (tests/cdp.py)


def say(page, text: str) -> dict:
    """Type `text` into the box, press Enter, and return the answer as the page shows it."""
    shown = "document.querySelectorAll('#log .msg:not(.user)').length"
    before = page.evaluate(shown)
    page.evaluate("document.getElementById('message').focus()")
    page.call("Input.insertText", {"text": text})
    page.press("Enter")
    page.wait_for(f"{shown} > {before}", timeout=DEADLINE, what=f"an answer to {text!r}")
    return page.evaluate("(() => { const m = [...document.querySelectorAll('#log .msg:not(.user)')].pop(); return "
                         "{text: m.firstChild.textContent, route: m.dataset.route, "
                         "meta: (m.querySelector('.meta') || {}).textContent}; })()")


def test_the_chat_page_talks_to_the_bot_in_a_real_browser(server, bot_dir, tmp_path):
    from cdp import Browser

    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install it with `apt-get install -y chromium`")
    spec = read_intents(bot_dir / "intents.yaml")
    with Browser(CHROMIUM, tmp_path / "profile") as browser:
        page = browser.open(server["url"] + "/")
        page.wait_for("!!document.getElementById('message')", timeout=DEADLINE, what="the chat page")
        assert page.evaluate("document.title") == spec.bot["name"]
        asked = say(page, trained_example(bot_dir, "order_status"))
        assert asked["route"] == "slot" and asked["text"] == spec.slots["order_id"].ask
        answered = say(page, "482913")  # the page keeps its session: the slot is filled
        assert answered["route"] == "intent" and "482913" in answered["text"]
        assert "order_status" in answered["meta"]
        faq = say(page, FAQ_QUESTION)
        assert faq["route"] == "faq" and "care.md" in faq["meta"]
        handed = say(page, NONSENSE)
        assert handed["route"] == "handoff" and "ticket T-" in handed["meta"]
        hostile = say(page, "<img src=x onerror=alert(1)>")  # shown as text, never parsed as markup
        assert page.evaluate("document.querySelectorAll('#log img').length") == 0 and hostile["text"]
        assert page.problems() == []  # no console error, no exception, nothing loaded from elsewhere
        error = say(page, " ")  # a blank message: the server's reason is shown, not a broken page
        assert error["route"] == "error" and "empty" in error["text"]
        assert all("400" in p for p in page.problems()), page.problems()  # the browser logs the 400 itself


# ---------------------------------------------------------------------------------------------------------------
# the default model, once, briefly


def test_the_default_model_is_minilm_and_trains_a_working_bot(tmp_path):
    res = cli("app", "bot", "train", "--example", "--epochs", "1", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    folder = Path(res.stdout.strip().splitlines()[-1])
    card = json.loads((folder / "bot.json").read_text())
    assert card["model_name"] == "minilm" and 0 < card["threshold"] < 1
    bot = Bot(folder, tickets=tmp_path / "t.jsonl")
    try:
        assert bot.reply("s", NONSENSE)["route"] in ("handoff", "faq", "intent", "slot")
    finally:
        bot.close()
