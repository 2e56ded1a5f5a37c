"""How well a bot understands a labelled test file: intent accuracy, out-of-scope detection, fallback and hand-off.

    nnforge app bot evaluate runs/bot/example --data test.csv      # -> runs/bot/example/eval.json

The file: CSV/TSV with a text and a label column; a label is an intent name, `faq` (a question the FAQ answers and
no intent covers) or `out_of_scope` (neither: the bot should hand off). Every message is judged on its own (no
session), as it would be as the first message of a conversation:

    intent accuracy     in-scope messages whose accepted intent is the right one (a rejected one counts as wrong)
    top-1 accuracy      the same without the threshold: the classifier alone
    out-of-scope        detection of the messages no intent covers (faq + out_of_scope) by the threshold:
                        precision, recall, F1, false accept and false reject rates
    fallback rate       share of messages answered from the FAQ; faq_answered: of the faq messages
    hand-off rate       share of messages handed to a person; handed_off: of the out_of_scope messages
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from nnforge.apps.bot.calibrate import f1_out_of_scope
from nnforge.apps.bot.dialogue import Bot
from nnforge.data.tables import read_table

NOT_INTENTS = ("faq", "out_of_scope")


def read_labelled(path: str | Path, text_col: str = "text", label_col: str = "label") -> list[tuple[str, str]]:
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    table = read_table(path, delimiter, {text_col: "--text-col", label_col: "--label-col"}, label=label_col)
    t, y = table.columns[text_col], table.columns[label_col]
    rows = []
    for line, fields in table.rows:
        text, label = fields[t].strip(), fields[y].strip()
        if not text or not label:
            raise ValueError(f"{path}:{line}: empty {'text' if not text else 'label'}; expected a message and its "
                             "label (an intent, faq or out_of_scope)")
        rows.append((text, label))
    if table.skipped:
        first = table.skipped[0]
        raise ValueError(f"{first['path']}: {first['reason']}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def score(bot: Bot, rows: list[tuple[str, str]]) -> dict:
    texts, labels = [t for t, _ in rows], [y for _, y in rows]
    unknown = sorted(set(labels) - set(bot.classes) - set(NOT_INTENTS))
    if unknown:
        raise ValueError(f"labels {unknown} are neither intents of this bot nor {' / '.join(NOT_INTENTS)}")
    got = bot.understand(texts)
    inside = np.array([y not in NOT_INTENTS for y in labels])
    accepted = np.array([u.accepted for u in got])
    right = np.array([u.intent == y for u, y in zip(got, labels, strict=True)])
    routes = Counter(u.route for u in got)
    oos = f1_out_of_scope(~inside, ~accepted)

    def share(mask) -> float | None:
        return float(np.mean(mask)) if len(mask) else None

    faq_rows = [u for u, y in zip(got, labels, strict=True) if y == "faq"]
    none_rows = [u for u, y in zip(got, labels, strict=True) if y == "out_of_scope"]
    mistakes = [{"text": t, "label": y, "intent": u.intent, "confidence": round(u.confidence, 4), "route": u.route}
                for t, y, u in zip(texts, labels, got, strict=True)
                if (y in NOT_INTENTS and u.accepted) or (y not in NOT_INTENTS and not (u.accepted and u.intent == y))]
    return {
        "n": len(rows), "n_in_scope": int(inside.sum()), "n_faq": len(faq_rows), "n_out_of_scope": len(none_rows),
        "threshold": bot.threshold, "intent_accuracy": share((accepted & right)[inside]),
        "top1_accuracy": share(right[inside]),
        "out_of_scope": {**oos, "false_accept": share(accepted[~inside]), "false_reject": share(~accepted[inside])},
        "fallback_rate": routes["faq"] / len(rows), "handoff_rate": routes["handoff"] / len(rows),
        "faq_answered": share(np.array([u.route == "faq" for u in faq_rows])),
        "handed_off": share(np.array([u.route == "handoff" for u in none_rows])),
        "routes": dict(routes), "mistakes": mistakes,
    }


def evaluate_bot(folder: str | Path, data: str | Path, out: str | Path | None = None) -> dict:
    bot = Bot(folder)
    try:
        report = {"data": str(data), **score(bot, read_labelled(data))}
    finally:
        bot.close()
    path = Path(out) if out else Path(folder) / "eval.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    report["output"] = str(path)
    return report


def summary(r: dict) -> str:
    def pct(v) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    o = r["out_of_scope"]
    return (f"{r['n']} messages ({r['n_in_scope']} in scope, {r['n_faq']} faq, {r['n_out_of_scope']} out of scope)\n"
            f"intent accuracy {pct(r['intent_accuracy'])} (classifier alone {pct(r['top1_accuracy'])})\n"
            f"out-of-scope F1 {o['f1']:.3f} (precision {o['precision']:.3f}, recall {o['recall']:.3f}; false accept "
            f"{pct(o['false_accept'])}, false reject {pct(o['false_reject'])} at threshold {r['threshold']:.3f})\n"
            f"fallback rate {pct(r['fallback_rate'])} (faq questions answered from the FAQ {pct(r['faq_answered'])})\n"
            f"hand-off rate {pct(r['handoff_rate'])} (out-of-scope messages handed off {pct(r['handed_off'])})")
