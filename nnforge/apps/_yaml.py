"""YAML files the apps read (intents, topics), with the line of every key, so a mistake is reported where it is.

    data, lines = read_yaml(Path("intents.yaml"))
    lines[("intents", "track_order", "answer")]      # -> 42, the line that key is on

A repeated key (which YAML would silently resolve to the last one) is refused with both lines. Errors are
AppFileError, a ValueError whose message is one line: "FILE:LINE: what is wrong; what was expected".
"""

from __future__ import annotations

from pathlib import Path

import yaml


class AppFileError(ValueError):
    """An app's input file cannot be used; the message names the file, the line and what was expected."""


def _walk(node: yaml.Node, path: tuple, lines: dict, file: Path) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name in seen:
                raise AppFileError(f"{file}:{key.start_mark.line + 1}: key '{name}' repeats the one on line "
                                   f"{seen[name]}; each key may appear once")
            seen[name] = key.start_mark.line + 1
            lines[(*path, name)] = key.start_mark.line + 1
            _walk(value, (*path, name), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), lines, file)


def read_yaml(path: Path) -> tuple[object, dict[tuple, int]]:
    """(the parsed document, {key path: line}) of a YAML file; AppFileError for what cannot be read."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise AppFileError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise AppFileError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise AppFileError(f"{where}: not valid YAML ({err.problem or err.context})") from None
    except yaml.YAMLError as err:
        raise AppFileError(f"{path}: not valid YAML ({err})") from None
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines, path)
    return data, lines


class Located:
    """Messages about a YAML file that name the line of the key they are about: `at(("intents", "x"), "...")`."""

    def __init__(self, path: Path, lines: dict[tuple, int]):
        self.path, self.lines = path, lines

    def line(self, key: tuple) -> int:
        while key and key not in self.lines:  # a key the file lacks: the line of the mapping that should hold it
            key = key[:-1]
        return self.lines.get(key, 1)

    def error(self, key: tuple, message: str) -> AppFileError:
        return AppFileError(f"{self.path}:{self.line(key)}: {message}")

    def mapping(self, value, key: tuple, allowed: dict[str, str], required: tuple[str, ...] = ()) -> dict:
        """`value` checked to be a mapping whose keys are among `allowed` (name -> what it is, for the message)."""
        what = "/".join(str(k) for k in key) or "the file"
        if not isinstance(value, dict):
            raise self.error(key, f"{what} must be a mapping of {', '.join(allowed)}, got {_kind(value)}")
        for name in value:
            if name not in allowed:
                listed = "; ".join(f"{k} ({v})" for k, v in allowed.items())
                raise self.error((*key, name), f"unknown key '{name}' in {what}; expected one of: {listed}")
        for name in required:
            if name not in value:
                raise self.error(key, f"{what} needs '{name}' ({allowed[name]})")
        return value

    def text(self, value, key: tuple, empty: bool = False) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.error(key, f"{'/'.join(str(k) for k in key)} must be text, got {_kind(value)}")
        value = str(value)
        if not empty and not value.strip():
            raise self.error(key, f"{'/'.join(str(k) for k in key)} is empty; expected text")
        return value

    def texts(self, value, key: tuple, at_least: int = 1) -> list[str]:
        what = "/".join(str(k) for k in key)
        if value is None:
            value = []
        if not isinstance(value, list):
            raise self.error(key, f"{what} must be a list of texts, got {_kind(value)}")
        out = [self.text(v, (*key, i)) for i, v in enumerate(value)]
        if len(out) < at_least:
            raise self.error(key, f"{what} has {len(out)} entries; expected at least {at_least}")
        return out


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "text", type(None): "nothing"}.get(type(value),
                                                                                    type(value).__name__)
