"""Training methods: each wires shared towers, knowledge modules and losses in one file.

``build_method(name, towers)`` is the one place that maps a config name to its class.
"""

from __future__ import annotations

from torch import nn

from kclip_ds.methods.clip import ClipMethod

METHODS: dict[str, type[nn.Module]] = {"clip": ClipMethod}


def build_method(name: str, towers) -> nn.Module:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}' (known: {', '.join(METHODS)})")
    return METHODS[name](towers.model)
