"""Token-trimming methods: each a validated dataclass, all run by the same engine."""

import sys
import types

from st3.methods.base import Method, get, methods, register
from st3.methods.composed import CDPrunerMethod, DARTMethod, DivPruneMethod, Keep
from st3.methods.controls import Random, Uniform
from st3.methods.fastv import FastV
from st3.methods.pyramiddrop import PyramidDrop
from st3.methods.selectors import (
    DART,
    VTA,
    Attention,
    CDPruner,
    DivPrune,
    RandomPick,
    Selector,
    Spread,
    Stratified,
    UniformPick,
)
from st3.methods.spread import SpreadMethod
from st3.methods.st3 import ST3
from st3.methods.stratified import StratifiedMethod
from st3.methods.visionzip import VisionZip
from st3.methods.vtw import VTW

__all__ = [
    "DART",
    "VTA",
    "Attention",
    "CDPruner",
    "CDPrunerMethod",
    "DARTMethod",
    "DivPrune",
    "DivPruneMethod",
    "Keep",
    "RandomPick",
    "Selector",
    "Spread",
    "SpreadMethod",
    "Stratified",
    "StratifiedMethod",
    "UniformPick",
    "ST3",
    "FastV",
    "Method",
    "PyramidDrop",
    "Random",
    "Uniform",
    "VTW",
    "VisionZip",
    "get",
    "methods",
    "register",
]


class _Package(types.ModuleType):
    """This package, callable: `st3.methods()` lists the registered names. (Importing the package makes
    `st3.methods` this module, which would otherwise hide the function of the same name; `st3` loads lazily.)"""

    def __call__(self) -> list[str]:
        return methods()


sys.modules[__name__].__class__ = _Package
