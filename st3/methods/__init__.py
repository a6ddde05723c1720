"""Token-trimming methods: each a validated dataclass (a schedule x a selector), all run by the same engine."""

import sys
import types

from st3.methods import composed as _composed  # noqa: F401  (registers the compositions)
from st3.methods.annealing import VTA
from st3.methods.base import METHODS, Method, get, methods, register
from st3.methods.cls import VTCCLS, FasterVLM
from st3.methods.fastv import FastV
from st3.methods.keep import DART, CDPruner, DivPrune, Keep, Lattice, Random, Spread, Stratified
from st3.methods.psigmoid import PSigmoid
from st3.methods.pyramiddrop import PyramidDrop
from st3.methods.schedule import Schedule, SparseVLM
from st3.methods.sgl import SGL
from st3.methods.st3 import ST3
from st3.methods.visionzip import VisionZip
from st3.methods.vtw import VTW

METHODS.rename("uniform", "lattice")
METHODS.rename("st3+uniform", "st3+raster")

__all__ = [
    "DART", "VTA", "VTCCLS", "VTW", "CDPruner", "DivPrune", "FastV", "FasterVLM", "Keep", "Lattice", "Method",
    "PSigmoid", "PyramidDrop", "Random", "SGL", "Schedule", "SparseVLM",
    "ST3", "Spread", "Stratified", "VisionZip", "get", "methods", "register",
]  # fmt: skip


class _Package(types.ModuleType):
    """This package, callable: `st3.methods()` lists the registered names. (Importing the package makes
    `st3.methods` this module, which would otherwise hide the function of the same name; `st3` loads lazily.)"""

    def __call__(self) -> list[str]:
        return methods()


sys.modules[__name__].__class__ = _Package
