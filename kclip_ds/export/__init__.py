"""Export kclip_ds runs: transformers CLIPModel + CLIPProcessor, or open_clip format, plus knowledge modules.

    from kclip_ds.export import convert, load_extras

Both names resolve lazily: knowledge modules import ``kclip_ds.export.extras`` to register themselves,
and an eager import of the converter (which imports the methods) here would make that circular.
"""

from __future__ import annotations

from typing import Any

__all__ = ["convert", "load_extras"]


def __getattr__(name: str) -> Any:
    if name == "convert":
        from kclip_ds.export.convert import convert

        return convert
    if name == "load_extras":
        from kclip_ds.export.extras import load_extras

        return load_extras
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
