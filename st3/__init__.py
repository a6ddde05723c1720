"""st3: trim visual tokens of vision-language models at inference time, with no retraining.

import st3
method = st3.ST3()
with method(model):
    out = model.generate(**inputs, max_new_tokens=64)
print(method.trace.summary())
"""

from st3.adapters import supported_models
from st3.budget import match
from st3.methods import (
    DART,
    ST3,
    VTA,
    VTW,
    Attention,
    CDPruner,
    DivPrune,
    FastV,
    Keep,
    Method,
    PyramidDrop,
    Random,
    RandomPick,
    Selector,
    Spread,
    Stratified,
    Uniform,
    UniformPick,
    VisionZip,
    get,
    methods,
    register,
)
from st3.trace import Trace

__all__ = [
    "ST3",
    "FastV",
    "PyramidDrop",
    "VTW",
    "VisionZip",
    "Random",
    "Uniform",
    "Method",
    "Keep",
    "Selector",
    "Attention",
    "RandomPick",
    "UniformPick",
    "Stratified",
    "Spread",
    "DivPrune",
    "DART",
    "CDPruner",
    "VTA",
    "Trace",
    "get",
    "match",
    "methods",
    "register",
    "supported_models",
]
__version__ = "0.1.0"
