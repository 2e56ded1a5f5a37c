"""`nnforge app bot ...`: argument parsing and printing only; the work is in train.py, dialogue.py, server.py.

    nnforge app bot train --example [--model fasttext]
    echo "where is my order?" | nnforge app bot chat runs/bot/example
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_parser(apps) -> None:
    bot = apps.add_parser("bot", help="a customer-service bot: intents, FAQ fallback, hand-off")
    cmds = bot.add_subparsers(dest="bot_command", required=True)

    tr = cmds.add_parser("train", help="train the intent classifier, calibrate its threshold, index the FAQ "
                                       "-> OUT/bot/NAME")
    tr.add_argument("--intents", help="intents YAML (intents with examples and answer templates, slots, "
                                      "out_of_scope messages)")
    tr.add_argument("--faq", help="folder of .md/.txt help pages to fall back on")
    tr.add_argument("--example", action="store_true", help="the shipped online-shop intents and FAQ (offline)")
    tr.add_argument("--model", default="minilm", help="nnforge text model for the intents (minilm: fine-tuned "
                                                      "MiniLM; fasttext: seconds to train, weaker on few examples)")
    tr.add_argument("--out", default="runs", help="parent folder: the bot goes to OUT/bot/NAME")
    tr.add_argument("--name", help="bot folder name (default: the intents file's name, or example)")
    tr.add_argument("--force", action="store_true", help="replace an existing bot folder")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--epochs", type=int, help="training epochs (default: the model's recipe and the size rules)")
    tr.add_argument("--lr", type=float, help="learning rate (default: the model's recipe)")
    tr.add_argument("--device", help="cpu, cuda, ... (default: auto)")

    ch = cmds.add_parser("chat", help="talk to a bot in the terminal (reads stdin; quit or Ctrl-D ends)")
    ch.add_argument("run", help="the bot folder (runs/bot/NAME)")
    ch.add_argument("--session", default="terminal", help="session id (its state lasts while you chat)")
    ch.add_argument("--json", action="store_true", help="print each answer as JSON")
    ch.add_argument("--log-conversations", help="append every turn to this JSON Lines file (opt-in)")

    sv = cmds.add_parser("serve", help="POST /v1/chat and a chat page at /",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sv.add_argument("run", help="the bot folder (runs/bot/NAME)")
    sv.add_argument("--host", default="127.0.0.1", help="any non-loopback address needs a token")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--token", help="bearer token for /v1/* (default: $NNFORGE_TOKEN)")
    sv.add_argument("--log-conversations", help="append every turn to this JSON Lines file (opt-in; marks the "
                                                "misunderstood ones for the continuous-learning loop)")
    sv.add_argument("--tickets", help="where hand-off tickets go: .db (SQLite) or .jsonl (default: RUN/tickets.db)")
    sv.add_argument("--timeout", type=float, default=10.0, help="seconds a message may wait for its answer")
    sv.add_argument("--access-log", action="store_true")

    ev = cmds.add_parser("evaluate", help="intent accuracy, out-of-scope F1, fallback and hand-off rates on a "
                                          "labelled file -> RUN/eval.json")
    ev.add_argument("run", help="the bot folder (runs/bot/NAME)")
    ev.add_argument("--data", help="CSV with text and label (an intent, faq or out_of_scope); default for the "
                                   "example bot: its shipped test.csv")
    ev.add_argument("--out", help="JSON file to write (default: RUN/eval.json)")
    ev.add_argument("--json", action="store_true", help="print the whole report as JSON")
    bot.set_defaults(app_func=run)


def run(a) -> int:
    return {"train": _train, "chat": _chat, "serve": _serve, "evaluate": _evaluate}[a.bot_command](a)


def _train(a) -> int:
    from nnforge.apps.bot.train import train_bot

    options = {k: v for k, v in (("epochs", a.epochs), ("lr", a.lr), ("device", a.device)) if v is not None}
    folder = train_bot(a.intents, a.faq, model=a.model, out=a.out, name=a.name, example=a.example, seed=a.seed,
                       force=a.force, **options)
    print(folder)
    return 0


def _chat(a) -> int:
    from nnforge.apps.bot.dialogue import Bot, MessageError

    bot = Bot(a.run, log=a.log_conversations)
    tty = sys.stdin.isatty()
    print(f"{bot.name}: {bot.spec.bot['greeting']}" + ("  (quit or Ctrl-D to end)" if tty else ""), flush=True)
    try:
        while True:
            try:
                line = input("you> " if tty else "")
            except EOFError:
                break
            if line.strip().lower() in ("quit", "exit"):
                break
            try:
                out = bot.reply(a.session, line)
            except MessageError as err:
                print(f"({err})", flush=True)
                continue
            if a.json:
                print(json.dumps(out, ensure_ascii=False), flush=True)
            else:
                extra = {"faq": lambda o: f"  [{o['source']['doc']}: {o['source']['title']}]",
                         "handoff": lambda o: f"  [ticket {o['ticket']}]"}.get(out["route"], lambda o: "")(out)
                print(f"bot> {out['reply']}{extra}", flush=True)
    finally:
        bot.close()
    return 0


def _serve(a) -> int:
    from nnforge.apps.bot.server import serve_bot

    serve_bot(a.run, a.host, a.port, a.token or os.environ.get("NNFORGE_TOKEN"), a.log_conversations, a.tickets,
              a.timeout, a.access_log)
    return 0


def _evaluate(a) -> int:
    from nnforge.apps.bot import EXAMPLE
    from nnforge.apps.bot.evaluate import evaluate_bot, summary

    data = a.data
    if data is None:
        card = json.loads((Path(a.run) / "bot.json").read_text())
        if Path(card["intents"]["file"]).resolve() != (EXAMPLE / "intents.yaml").resolve():
            raise ValueError("--data is required (a CSV of text and label) for a bot not trained on the example")
        data = EXAMPLE / "test.csv"
    report = evaluate_bot(a.run, data, a.out)
    print(json.dumps(report, indent=2, ensure_ascii=False) if a.json else summary(report))
    print(f"wrote {report['output']}", file=sys.stderr)
    return 0
