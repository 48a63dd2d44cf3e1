"""Knowledge modules beside the towers: ``kclip_extras.safetensors`` + ``kclip_extras.json``.

The contract every method keeps (graph encoder, fusion, heads — any trained non-tower part):

1. The module is a direct attribute of the method (``method.graph_encoder``), not inside ``method.model``.
2. Its class is decorated with ``@register_extra("name")`` and has ``extra_config() -> dict``, the
   JSON-able keyword arguments that rebuild it: ``cls(**extra_config())``.
3. The exporter writes each module's state as ``<attribute>.<parameter>`` tensors in the safetensors
   file and ``{"format": "kclip_ds/extras/v1", "method": …, "modules": {attribute: {"type": name,
   "config": {…}}}}`` in the JSON; ``load_extras(DIR)`` rebuilds ``{attribute: module}`` with weights.

A method without knowledge modules (plain CLIP) exports an empty pair of files, so tools can rely on them.
Only registered classes are built: the JSON never names code to import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from kclip_ds.export.hf import ExportError

EXTRAS_WEIGHTS = "kclip_extras.safetensors"
EXTRAS_JSON = "kclip_extras.json"
EXTRAS_FORMAT = "kclip_ds/extras/v1"
_REGISTRY: dict[str, type[nn.Module]] = {}


def register_extra(name: str):
    """Class decorator: make a knowledge module exportable under ``name``."""
    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if not hasattr(cls, "extra_config"):
            raise TypeError(f"{cls.__name__} needs extra_config() -> dict to be exportable")
        _REGISTRY[name] = cls
        cls.extra_type = name
        return cls
    return decorate


def extra_modules(method: nn.Module) -> dict[str, nn.Module]:
    """The method's trained non-tower children (those holding parameters)."""
    found = {}
    for name, child in method.named_children():
        if name == "model" or not any(True for _ in child.parameters()):
            continue
        if getattr(type(child), "extra_type", None) not in _REGISTRY:
            raise ExportError(f"module '{name}' ({type(child).__name__}) of {type(method).__name__} is not registered "
                              f"for export: decorate its class with @register_extra and give it extra_config()")
        found[name] = child
    return found


def save_extras(out_dir: Path, method: nn.Module, method_name: str) -> dict[str, Any]:
    modules = extra_modules(method)
    tensors = {f"{name}.{key}": value.detach().float().contiguous().clone()
               for name, module in modules.items() for key, value in module.state_dict().items()}
    save_file(tensors, str(out_dir / EXTRAS_WEIGHTS))
    meta = {"format": EXTRAS_FORMAT, "method": method_name,
            "modules": {name: {"type": type(m).extra_type, "config": m.extra_config()} for name, m in modules.items()}}
    (out_dir / EXTRAS_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def load_extras(directory: str | Path) -> dict[str, nn.Module]:
    """Rebuild the knowledge modules of an exported model: {attribute name: module with its weights}."""
    import kclip_ds.methods  # noqa: F401 — registers the knowledge modules the methods use

    directory = Path(directory)
    meta_path, weights_path = directory / EXTRAS_JSON, directory / EXTRAS_WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise ExportError(f"{directory}: {EXTRAS_JSON} / {EXTRAS_WEIGHTS} not found; export with tools/convert_to_hf.py")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != EXTRAS_FORMAT:
        raise ExportError(f"{meta_path}: format {meta.get('format')!r}, expected {EXTRAS_FORMAT!r}")
    tensors = load_file(str(weights_path))
    modules = {}
    for name, spec in meta["modules"].items():
        if spec["type"] not in _REGISTRY:
            raise ExportError(f"{meta_path}: module '{name}' has unknown type {spec['type']!r} "
                              f"(known: {', '.join(sorted(_REGISTRY)) or 'none'})")
        module = _REGISTRY[spec["type"]](**spec["config"])
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
        modules[name] = module.eval()
    return modules
