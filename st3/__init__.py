"""st3: trim visual tokens of vision-language models at inference time, with no retraining.

import st3
method = st3.ST3()
with method(model):
    out = model.generate(**inputs, max_new_tokens=64)
print(method.trace.summary())

Methods are `st3.X` (`st3.get(name)`, `st3.methods()`); the rules that choose tokens are `st3.selectors.X`.
The public names load on first use (PEP 562): `import st3` costs no transformers import, so the command
line starts fast and the selectors run where another transformers version is installed (the vLLM plugin).
"""

from __future__ import annotations

import importlib
import warnings

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        (
            "ST3", "FastV", "PyramidDrop", "VTW", "VisionZip", "Keep", "Random", "Lattice", "DivPrune", "DART",
            "CDPruner", "Spread", "Stratified", "Method", "VTA", "get", "methods", "register", "FasterVLM", "VTCCLS",
            "Schedule", "SparseVLM", "SGL", "PSigmoid",
        ),
        "st3.methods",
    ),
    "supported_models": "st3.adapters",
    "match": "st3.budget",
    "Trace": "st3.trace",
}  # fmt: skip
#: names of 0.1 that moved: old name -> (module, new name); they warn, and go in the next release
_MOVED: dict[str, tuple[str, str]] = {
    "Uniform": ("st3.methods", "Lattice"),
    "Selector": ("st3.selectors", "Selector"),
    "Attention": ("st3.selectors", "Attention"),
    "RandomPick": ("st3.selectors", "Random"),
    "UniformPick": ("st3.selectors", "Raster"),
}

#: subpackages reachable as attributes without their own import (`st3.selectors.DivPrune()`)
_SUBPACKAGES = ("adapters", "selectors")

__all__ = [*_EXPORTS, *_SUBPACKAGES]
__version__ = "0.2.0"


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"st3.{name}")
    if name in _MOVED:
        module, new = _MOVED[name]
        warnings.warn(
            f"st3.{name} is now {module.replace('.methods', '')}.{new}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), new)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'st3' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
