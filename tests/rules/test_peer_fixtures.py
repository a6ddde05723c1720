"""The peer fixtures (tests/fixtures/peers/) are sound data: each case's inputs rebuild bit for bit from its
recipe (the stored digest), and its kept indices are a sorted set of the stated size within the visual tokens.

What st3 must match in them is issue 28's phase 2; this file only guards the data those tests will read.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

import pytest

HERE = Path(__file__).parents[1] / "fixtures" / "peers"
sys.path.insert(0, str(HERE))
import inputs  # noqa: E402

#: What each peer's rule reads, rebuilt from a recipe.
READS = {
    "divprune": lambda r: (inputs.features(r)[0],),
    "fastv": lambda r: inputs.attention(r),
    "pyramiddrop": lambda r: tuple(t for stage in range(3) for t in inputs.attention(r, stage)),
    "visionzip": lambda r: inputs.vision(r),
    "cdpruner": lambda r: (inputs.features(r), *inputs.clip(r)),
    "dart": lambda r: inputs.dart(r),
}


@cache
def _digest(peer: str, recipe: inputs.Recipe) -> str:
    """Cases that differ only in their knobs share a recipe: build its inputs once."""
    return inputs.digest(*READS[peer](recipe))


def _cases():
    for peer in READS:
        data = json.loads((HERE / f"{peer}.json").read_text())
        for case in data["cases"] + data.get("batch_cases", []):
            yield pytest.param(peer, case, id=f"{peer}-{case['name']}")


@pytest.mark.parametrize(("peer", "case"), list(_cases()))
def test_case_is_sound(peer, case):
    recipe = inputs.Recipe.from_dict(case["recipe"])
    assert _digest(peer, recipe) == case["digest"], "inputs no longer rebuild as recorded"
    if peer == "pyramiddrop":
        kept_sets = [stage["kept"] for stage in case["stages"]]
        assert [len(k) for k in kept_sets] == case["counts"]
    else:
        kept_sets = case["kept"] if isinstance(case["kept"][0], list) else [case["kept"]]
        assert all(len(kept) == case["count"] for kept in kept_sets)
    for kept in kept_sets:
        assert kept == sorted(set(kept)) and kept[0] >= 0 and kept[-1] < recipe.visual


def test_recipe_refuses_bad_values():
    with pytest.raises(ValueError, match="^kind"):
        inputs.Recipe(seed=0, kind="uniform")
    with pytest.raises(ValueError, match="^dtype"):
        inputs.Recipe(seed=0, dtype="float64")
