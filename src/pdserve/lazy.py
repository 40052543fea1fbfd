"""Names a package exports but imports on first use (PEP 562): what needs torch stays out of processes that never
touch it (the ingress imports the request types, the KV wire format's secret and the block pool, not the engine, the
KV tensors or the transports)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A package's module-level `__getattr__`: each name of `where` comes from its module (name -> module) on first
    use, then stays an attribute of the package."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
