"""Every knob of every registered method, selector and `VTA` is checked by type and range when it is built.

A fuzz over all of them (st3.knobs, then each class's `validate`): a wrong type, a boolean, a string, NaN or an
infinity, a negative or a huge value is either refused at construction with a ValueError that starts with the
knob's name, or accepted as a value of the knob's annotated type that runs (or is refused, naming the knob, when
applied to a model too shallow for it). Nothing ends in a raw traceback after the model has loaded.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import single

import st3
from st3.knobs import check_types, describe, knob_types
from st3.selectors import SELECTORS, Selector

#: Wrong types, booleans, strings, NaN and infinities, negatives, zero, huge, beyond 64 bits.
VALUES = (True, False, "abc", "", [1], [True], {}, None, math.nan, math.inf, -math.inf, -1, -0.5, 0, 1, 0.5,
          10**12, 1e12, 2**70)  # fmt: skip

#: The accepted values that are also run on the tiny model: the huge ones (the others are usual values).
RUN = (10**12, [1])

#: What runs each kind of owner on the tiny model (a selector at layer 1: attention needs a layer before it).
HOSTS = {
    "method": lambda name, knobs: st3.get(name, **knobs),
    "selector": lambda name, knobs: selector_host(SELECTORS.get(name, **knobs)),
    "vta": lambda name, knobs: st3.FastV(ratio=0.3, decode=st3.VTA(**{"steps": 3, "every": 1} | knobs)),
}


def selector_host(rule: Selector) -> st3.Method:
    """A prefill rule at layer 1 of Keep; a rule that reads decode-time attention as VTA's eviction rule."""
    if "received" in rule.reads:
        return st3.FastV(ratio=0.3, decode=st3.VTA(steps=3, every=1, evict=rule))
    return st3.Keep(keep=12, layer=1, selector=rule)


def owners() -> list[tuple[str, str, type]]:
    """Every registered method, every selector with a knob, and VTA."""
    return (
        [("method", name, type(st3.get(name))) for name in st3.methods()]
        + [("selector", name, SELECTORS.cls(name)) for name in SELECTORS.names() if knob_types(SELECTORS.cls(name))]
        + [("vta", "vta", st3.VTA)]
    )


@pytest.mark.parametrize(("kind", "name", "cls"), owners(), ids=[f"{k}-{n}" for k, n, _ in owners()])
def test_every_knob_is_refused_by_name_or_runs(kind, name, cls, model, inputs):
    one = single(inputs, 0)
    for knob in knob_types(cls):
        for value in VALUES:
            try:
                method = HOSTS[kind](name, {knob: value})
            except ValueError as error:
                assert str(error).startswith(f"{knob}: "), (knob, value, error)
                continue
            built = getattr(method, knob) if kind == "method" else None
            if built is not None and not isinstance(built, (Selector, st3.VTA)):
                check_types(method)  # what was stored is of the annotated type (no error), and kept as given
                assert built == value or (isinstance(value, list) and built == tuple(value)), (knob, value, built)
            if not any(value == extreme and type(value) is type(extreme) for extreme in RUN):
                continue
            try:
                with method(model), torch.no_grad():
                    model.generate(**one, max_new_tokens=3, do_sample=False)
            except ValueError as error:  # a layer beyond the tiny model's depth: refused when applied
                assert str(error).startswith(f"{knob}: ") and "beyond" in str(error), (knob, value, error)


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"keep": 1.5}, "keep: must be an integer, got 1.5"),
        ({"keep": True}, "keep: must be an integer, got True (bool)"),
        ({"ratio": "abc"}, "ratio: must be a finite number, got 'abc' (str)"),
        ({"ratio": math.nan}, "ratio: must be a finite number, got nan"),
        ({"keep": 2**70}, "keep: must fit in 64 bits (it becomes a tensor value), got 1180591620717411303424"),
        ({"selector": 3}, "selector: must be a Selector, a string or None, got 3 (int)"),
        ({"stages": [8, True]}, "stages: must be a list of integers or None, got [8, True] (list)"),
    ],
)
def test_a_wrong_type_is_refused_saying_what_is_allowed(knobs, message):
    name = {"keep": "spread", "ratio": "fastv", "selector": "st3", "stages": "pyramiddrop"}[next(iter(knobs))]
    with pytest.raises(ValueError) as error:
        st3.get(name, **knobs)
    assert str(error.value) == message


def test_values_are_stored_as_their_annotated_type():
    assert type(st3.get("st3", ratio=0).ratio) is float  # st3.match then searches a float, not an integer
    assert st3.PyramidDrop(stages=[8, 16]).stages == (8, 16)
    assert st3.get("spread", keep=torch.tensor(5).item()).keep == 5


def test_an_unknown_knob_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"^colour: not a knob of spread; its knobs: keep, layer, ") as error:
        st3.get("spread", colour=1)
    assert isinstance(error.value, TypeError)  # what the dataclass itself raises, for callers that caught that


def test_every_annotation_of_every_knob_is_one_the_checker_knows():
    for _, _, cls in owners():
        for knob, annotation in knob_types(cls).items():
            assert describe(annotation), (cls, knob)

    @dataclasses.dataclass
    class Odd:
        mapping: dict[str, int] = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="cannot check a knob annotated"):
        check_types(Odd())
