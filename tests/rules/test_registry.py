"""The registries: one mechanism for methods and selectors, old names that warn, and a README that lists them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import st3

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_methods_table_is_the_registry():
    """Every registered method that is not a composition (`a+b`) has a row, and every row is registered."""
    text = README.read_text()
    table = text[text.index("| method | paper | rule | knobs (defaults) |") :].split("\n\n")[0]
    rows = re.findall(r"^\| `([a-z0-9+]+)` \|", table, flags=re.M)
    assert sorted(rows) == sorted(name for name in st3.methods() if "+" not in name)


def test_the_readme_models_table_is_the_adapters():
    """The supported-models table is generated from the adapters (`python -m st3.catalogue` rewrites it): every
    served class appears in it, and a README edited by hand, or an adapter changed without regenerating, fails."""
    from st3.adapters import supported_models
    from st3.catalogue import models_table, readme_with_table

    text = README.read_text()
    assert readme_with_table(text) == text, "the README's supported-models table is stale: run python -m st3.catalogue"
    assert all(f"`{name}`" in models_table() for name in supported_models())
    assert readme_with_table(text.replace("| Gemma 3 |", "| Gemma |")) != text.replace("| Gemma 3 |", "| Gemma |")


def test_the_readme_lists_every_selector():
    text = README.read_text()
    paragraph = text[text.index("× a **selector**") :].split("\n\n")[0]
    assert sorted(set(re.findall(r"`([a-z]+)`", paragraph)) & set(st3.selectors.names())) == st3.selectors.names()


def test_methods_and_selectors_register_the_same_way():
    for registry in (st3.methods, st3.selectors.names):
        for name in registry():
            build = st3.get if registry is st3.methods else st3.selectors.get
            assert build(name).name == name and type(build(name)).__doc__
    with pytest.raises(ValueError, match="available: .*spread"):
        st3.get("sparse")
    with pytest.raises(ValueError, match="available: .*divprune"):
        st3.selectors.get("divprun")


@pytest.mark.parametrize(
    "old, new",
    [
        (lambda: st3.get("uniform"), st3.Lattice),
        (lambda: st3.get("st3+uniform"), type(st3.get("st3+raster"))),
        (lambda: st3.Uniform, st3.Lattice),
        (lambda: st3.UniformPick, st3.selectors.Raster),
        (lambda: st3.RandomPick, st3.selectors.Random),
        (lambda: st3.selectors.get("uniform"), st3.selectors.Raster),
    ],
)
def test_renamed_names_warn_and_still_work(old, new):
    with pytest.warns(DeprecationWarning, match="next release"):
        found = old()
    assert found is new or isinstance(found, new)


def test_a_method_passed_as_a_selector_gives_its_rule_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"st3\.selectors\.DivPrune"):
        method = st3.ST3(selector=st3.DivPrune())
    assert type(method.selector) is st3.selectors.DivPrune
    with pytest.raises(ValueError, match="decode"):
        st3.Keep(selector="accumulated")  # a decode-time rule at prefill


def test_the_two_evenly_spread_rules_have_distinct_names_and_keep_what_they_say():
    from st3.adapters import Grid
    from st3.selectors import View

    candidates = torch.ones(1, 36, dtype=torch.bool)

    def kept(rule):
        view = View(layer=0, candidates=candidates, keep=torch.tensor([6]), attention=None, hidden=lambda: None,
                    keys=lambda: None, grids=[[Grid(1, 6, 6)]])  # fmt: skip
        return rule.select(view)[0].nonzero().squeeze(-1).tolist()

    assert kept(st3.selectors.Lattice()) == [7, 9, 11, 25, 27, 29]  # a 2 x 3 lattice on the 6 x 6 grid
    assert kept(st3.selectors.Raster()) == [3, 9, 15, 21, 27, 33]  # every 6th patch in raster order





def test_every_method_implements_the_engines_policy():
    """The engine calls only what `st3.engine.protocol.Policy` declares; every registered method has all of it."""
    from st3.engine.protocol import Policy

    members = {name for name in vars(Policy) if not name.startswith("_")} | set(Policy.__annotations__)
    assert {"choose", "evict", "prefill_keep", "host_decode_budget", "accumulates"} <= members
    for name in st3.methods():
        method = st3.get(name)
        missing = [member for member in members if not hasattr(method, member)]
        assert not missing, (name, missing)
