"""st3: trim visual tokens of vision-language models at inference time, with no retraining.

import st3
method = st3.ST3()
with method(model):
    out = model.generate(**inputs, max_new_tokens=64)
print(method.trace.summary())

The public names load on first use (PEP 562): `import st3` costs no transformers import, so the command
line starts fast and the selectors run where another transformers version is installed (the vLLM plugin).
"""

from __future__ import annotations

import importlib

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        (
            "ST3", "FastV", "PyramidDrop", "VTW", "VisionZip", "Random", "Uniform", "Method", "Keep", "Selector",
            "Attention", "RandomPick", "UniformPick", "Stratified", "Spread", "DivPrune", "DART", "CDPruner",
            "VTA", "get", "methods", "register",
        ),
        "st3.methods",
    ),
    "supported_models": "st3.adapters",
    "match": "st3.budget",
    "Trace": "st3.trace",
}  # fmt: skip

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'st3' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
