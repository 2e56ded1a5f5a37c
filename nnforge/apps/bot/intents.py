"""The intents file: what the bot understands and how it answers, checked before anything is trained.

    spec = read_intents(Path("intents.yaml"))
    spec.intents["order_status"].answer          # "Order {order_id} left our warehouse ..."
    spec.slots["order_id"].find("it is 482913")   # "482913"

    bot:          name, greeting, handoff (may use {ticket}), faq_intro, not_understood
    slots:        NAME: {pattern: a regular expression (its first group, or the whole match), ask: the question}
    intents:      NAME: {examples: [utterances], answer: a template with {slot} fields, follow_up, action}
    out_of_scope: [messages no intent covers], used to calibrate the out-of-scope threshold

An unknown key, an intent with too few examples, a template naming an unknown slot, a slot pattern that does not
compile or an example given to two intents is refused with the file, the line and what was expected.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from nnforge.apps._yaml import Located, read_yaml

MIN_EXAMPLES = 3  # two to train on and one held out to calibrate the threshold, at the very least
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
RESERVED = ("faq", "out_of_scope", "handoff")  # labels evaluate.py gives messages that are not an intent

TOP_KEYS = {"bot": "the bot's own messages", "slots": "values the bot asks for", "intents": "what it understands",
            "out_of_scope": "messages no intent covers"}
BOT_KEYS = {"name": "shown on the chat page", "greeting": "the first message", "handoff": "said when a person takes "
            "over; may use {ticket}", "faq_intro": "said before an FAQ passage", "not_understood": "said when "
            "asking for a slot again"}
SLOT_KEYS = {"pattern": "a regular expression that finds the value", "ask": "the question that asks for it"}
INTENT_KEYS = {"examples": "utterances of this intent", "answer": "the reply, a template with {slot} fields",
               "follow_up": "a sentence added after the answer", "action": "answer (default) or handoff"}
DEFAULT_BOT = {"name": "Assistant", "greeting": "Hello! How can I help?",
               "handoff": "I'm passing this to a colleague, who will get back to you (ticket {ticket}).",
               "faq_intro": "This may help:", "not_understood": "Sorry, I didn't catch that."}


@dataclass
class Slot:
    name: str
    pattern: re.Pattern
    ask: str

    def find(self, message: str) -> str | None:
        m = self.pattern.search(message)
        if m is None:
            return None
        return (m.group(1) if m.groups() and m.group(1) is not None else m.group(0)).strip()


@dataclass
class Intent:
    name: str
    examples: list[str]
    answer: str = ""
    follow_up: str = ""
    action: str = "answer"
    slots: list[str] = field(default_factory=list)  # the slots its answer needs, in the order they appear
    lines: list[int] = field(default_factory=list)  # the line of each example


@dataclass
class IntentSpec:
    path: Path
    bot: dict[str, str]
    slots: dict[str, Slot]
    intents: dict[str, Intent]
    out_of_scope: list[str]

    def fill(self, template: str, values: dict[str, str]) -> str:
        return template.format(**values)


def template_fields(template: str, loc: Located, key: tuple, allowed: set[str], what: str) -> list[str]:
    """The {fields} of a template, each checked to be one of `allowed`."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise loc.error(key, f"{what} is not a valid template ({err}); write a literal brace as {{{{ or }}}}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or spec or conversion or not NAME.fullmatch(name):
            raise loc.error(key, f"{what} has the field {{{name}{'!' + conversion if conversion else ''}"
                                 f"{':' + spec if spec else ''}}}; expected a slot name in braces, e.g. "
                                 f"{{{next(iter(sorted(allowed)), 'order_id')}}}")
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none are defined"
            raise loc.error(key, f"{what} refers to the unknown slot '{name}'; known slots: {known}")
        if name not in names:
            names.append(name)
    return names


def read_intents(path: str | Path) -> IntentSpec:
    path = Path(path)
    data, lines = read_yaml(path)
    loc = Located(path, lines)
    top = loc.mapping(data, (), TOP_KEYS, required=("intents",))
    bot = dict(DEFAULT_BOT)
    for k, v in loc.mapping(top.get("bot") or {}, ("bot",), BOT_KEYS).items():
        bot[k] = loc.text(v, ("bot", k))
    template_fields(bot["handoff"], loc, ("bot", "handoff"), {"ticket"}, "bot/handoff")

    slots = {}
    raw_slots = top.get("slots") or {}
    if not isinstance(raw_slots, dict):
        raise loc.error(("slots",), "slots must be a mapping of NAME: {pattern, ask}")
    for name, raw in raw_slots.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise loc.error(("slots", name), f"slot name '{name}': expected lower-case letters, digits and _")
        key = ("slots", name)
        loc.mapping(raw, key, SLOT_KEYS, required=("pattern", "ask"))
        try:
            pattern = re.compile(loc.text(raw["pattern"], (*key, "pattern")))
        except re.error as err:
            raise loc.error((*key, "pattern"), f"slots/{name}/pattern is not a valid regular expression ({err})") \
                from None
        slots[name] = Slot(name, pattern, loc.text(raw["ask"], (*key, "ask")))

    raw_intents = top["intents"]
    if not isinstance(raw_intents, dict) or len(raw_intents) < 2:
        raise loc.error(("intents",), "intents must be a mapping of at least two intents (NAME: {examples, answer})")
    intents, seen = {}, {}
    for name, raw in raw_intents.items():
        key = ("intents", name)
        if not isinstance(name, str) or not NAME.fullmatch(name) or name in RESERVED:
            why = "is reserved" if name in RESERVED else "is not lower-case letters, digits and _"
            raise loc.error(key, f"intent name '{name}' {why}; expected a name like order_status")
        loc.mapping(raw, key, INTENT_KEYS)
        examples = loc.texts(raw.get("examples"), (*key, "examples"), at_least=0)
        if len(examples) < MIN_EXAMPLES:
            raise loc.error((*key, "examples"), f"intent '{name}' has {len(examples)} example(s); expected at least "
                                                f"{MIN_EXAMPLES} utterances under examples (10 or more work well)")
        action = loc.text(raw.get("action", "answer"), (*key, "action"))
        if action not in ("answer", "handoff"):
            raise loc.error((*key, "action"), f"intents/{name}/action is '{action}'; expected answer or handoff")
        if action == "answer" and "answer" not in raw:
            raise loc.error(key, f"intent '{name}' needs an answer (a template), or action: handoff")
        answer = loc.text(raw.get("answer", ""), (*key, "answer"), empty=action == "handoff")
        follow = loc.text(raw.get("follow_up", ""), (*key, "follow_up"), empty=True)
        used = template_fields(answer, loc, (*key, "answer"), set(slots), f"intents/{name}/answer")
        template_fields(follow, loc, (*key, "follow_up"), set(used), f"intents/{name}/follow_up")
        ex_lines = [loc.line((*key, "examples", i)) for i in range(len(examples))]
        for text, line in zip(examples, ex_lines, strict=True):
            norm = " ".join(text.lower().split())
            if norm in seen and seen[norm][0] != name:
                raise loc.error((*key, "examples"), f"the example '{text}' (line {line}) is also an example of "
                                                    f"'{seen[norm][0]}' (line {seen[norm][1]}); give it to one intent")
            seen[norm] = (name, line)
        intents[name] = Intent(name, examples, answer, follow, action, used, ex_lines)
    oos = loc.texts(top.get("out_of_scope"), ("out_of_scope",), at_least=0)
    return IntentSpec(path, bot, slots, intents, oos)
