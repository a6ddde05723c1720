"""The transformers seam: st3 runs on every version of the declared range, under its calling conventions."""

from __future__ import annotations

import logging
import warnings
from importlib.metadata import requires

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import st3
from st3 import compat
from st3.engine.cache import PrunableLayer


def declared_range() -> SpecifierSet:
    """The transformers range st3's installed metadata declares (from pyproject.toml)."""
    return next(r.specifier for r in map(Requirement, requires("st3")) if r.name == "transformers")


def test_the_installed_transformers_is_inside_the_declared_range():
    assert Version(transformers.__version__) in declared_range(), (
        f"transformers {transformers.__version__} is outside the declared {declared_range()}"
    )


def test_the_declared_range_has_an_upper_bound_below_the_next_major():
    # Only tested versions are declared: an open range up to 6 let 5.24 break every fresh install.
    assert not declared_range().contains("5.99"), "declare only the minor versions CI tests (e.g. <5.25)"


def test_the_cache_keyword_follows_the_installed_version():
    expected = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"
    assert expected == compat.CACHE_KWARG


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_engine_takes_the_cache_under_either_keyword(name):
    cache, kwargs = object(), {name: object(), "other": 1}
    kwargs[name] = cache
    assert compat.take_cache(kwargs) is cache
    assert kwargs == {"other": 1}


def test_two_different_caches_are_refused():
    with pytest.raises(ValueError, match="two different caches"):
        compat.take_cache({"cache": object(), "past_key_values": object()})


def test_a_pruned_cache_layer_cannot_be_cropped():
    assert PrunableLayer.is_croppable is False
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        PrunableLayer().crop(1)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_generate_and_forward_under_a_method_raise_no_deprecation_warning(model, inputs):
    """No FutureWarning (deprecated keywords) and no deprecation log line (deprecated output fields)."""
    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            method = st3.ST3(start_layer=1, stride=1, ratio=0.5, anneal_steps=4, anneal_every=1)
            with method(model):
                out = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None,
                                     return_dict_in_generate=True)  # fmt: skip
                forward = model(**inputs, use_cache=True)
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if "deprecat" in m.lower()], records.messages
    for output in (out, forward):
        layers = compat.cache_of(output).layers
        assert all(isinstance(layer, PrunableLayer) for layer in layers)
        assert layers[-1].keys.shape[2] < inputs["input_ids"].shape[1]  # the pruned layer holds fewer slots


def test_a_plain_forward_under_a_method_fills_the_prunable_cache(model, inputs):
    """5.24 passes the cache as `cache=`: were it lost in **kwargs, nothing would be cached or pruned."""
    method = st3.ST3(start_layer=1, stride=1, ratio=0.5)
    with method(model):
        out = model(**inputs, use_cache=True)
    cache = compat.cache_of(out)
    assert cache is not None
    held = [layer.keys.shape[2] for layer in cache.layers]
    assert held[0] == inputs["input_ids"].shape[1] and held[-1] < held[0]
    assert method.trace.visual_per_layer[-1] < method.trace.visual_per_layer[0]
    assert torch.isfinite(out.logits).all()
