"""Method specs as the command line, the bench, `st3 eval` and the lmms-eval plugin write them.

A spec is `name`, `name:knob=value,knob=value` or `name:match` (bench: match the budget knob to ST3's cost);
`--knob KNOB=VALUE` gives one knob. Every value goes through `parse_value`, so `true`, `0.5`, `"text"` and
`[2, 5]` mean the same wherever they are written.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field


def parse_value(text: str):
    """A knob value: JSON (`true`, `0.5`, `[2, 5]`), else a Python literal (`True`, `None`), else the text."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_knob(item: str) -> tuple[str, object]:
    """`"ratio=0.3"` -> ("ratio", 0.3)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KNOB=VALUE, got {item!r}")
    return key.strip(), parse_value(value)


def parse_knobs(items: list[str]) -> dict:
    """`["ratio=0.3", "query=text"]` -> {"ratio": 0.3, "query": "text"}."""
    return dict(parse_knob(item) for item in items)


@dataclass
class Choice:
    """One parsed method spec."""

    name: str
    knobs: dict = field(default_factory=dict)
    match: bool = False

    @property
    def label(self) -> str:
        if self.match:
            return f"{self.name} (matched)"
        if not self.knobs:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={v}" for k, v in self.knobs.items()) + ")"


def parse(spec: str) -> Choice:
    """'name', 'name:match' or 'name:k=v,k=v'."""
    name, _, rest = spec.strip().partition(":")
    choice = Choice(name.strip().lower())
    for item in filter(None, (part.strip() for part in rest.split(","))):
        if item == "match":
            choice.match = True
            continue
        try:
            key, value = parse_knob(item)
        except ValueError:
            raise ValueError(f"method spec {spec!r}: expected knob=value, got {item!r}") from None
        choice.knobs[key] = value
    return choice


def build(spec: str, knobs: list[str] = ()):
    """The method of a spec (`name:knob=value,...`), with `--knob KNOB=VALUE` items on top (they win)."""
    import st3

    choice = parse(spec)
    if choice.match:
        raise ValueError(f"method spec {spec!r}: ':match' is st3 bench's; give knobs or a budget instead")
    return st3.get(choice.name, **(choice.knobs | parse_knobs(list(knobs))))


#: The dtype names of every command (`--dtype`), and the torch dtype each stands for.
DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(text: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> str:
    """`text` as one of `allowed` (`fp32`, `bf16`, `fp16`, `auto`); torch's names (`float32`, ...) are read alike."""
    name = {long: short for short, long in DTYPES.items()}.get(text, text)
    if name not in allowed:
        raise ValueError(f"dtype: must be one of {', '.join(allowed)}, got {text!r}")
    return name
