"""Token-trimming methods: each a validated dataclass, all run by the same engine."""

from st3.methods.base import Method, get, methods, register
from st3.methods.st3 import ST3

__all__ = ["ST3", "Method", "get", "methods", "register"]
