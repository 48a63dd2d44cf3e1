"""Export kclip_ds runs: transformers CLIPModel + CLIPProcessor, or open_clip format, plus knowledge modules.

    from kclip_ds.export import convert, load_extras
"""

from kclip_ds.export.convert import convert
from kclip_ds.export.extras import load_extras

__all__ = ["convert", "load_extras"]
