"""Is a saved file whole, and are saved weights finite? Checked before a folder is trusted (to resume, to start a
run from, to evaluate), so a broken file is named by its path instead of surfacing as a library's deep error or a
NaN loss many steps later. transformers checks neither: it reports a truncated safetensors file as a header error
of no named file, and loads NaN weights silently."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def safetensors_problem(path: Path) -> str | None:
    """A truncated safetensors file: its header must parse and every tensor's bytes must be inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > size - 8:
                return f"{path.name} is truncated"
            header = json.loads(f.read(header_size))
    except (struct.error, ValueError, UnicodeDecodeError):
        return f"{path.name} is truncated or not a safetensors file"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return f"{path.name} is truncated" if 8 + header_size + end > size else None


def file_problem(path: Path) -> str | None:
    """Whether a file a crash may have cut short is whole (torch files are zip archives: their directory is last)."""
    name = path.name
    if name.endswith(".safetensors"):
        return safetensors_problem(path)
    if name.endswith((".pt", ".pth", ".bin")):
        return None if zipfile.is_zipfile(path) else f"{name} is truncated"
    if name.endswith(".json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return f"{name} is truncated or not JSON"
    return None


def weights_problem(folder: str | Path) -> str | None:
    """The first broken weight file of a model folder, as '<path> is truncated'; else None."""
    folder = Path(folder)
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES):
            problem = file_problem(path)
            if problem:
                return f"{folder}/{problem}"
    return None


def nonfinite_safetensors(folder: str | Path) -> str | None:
    """The first tensor holding NaN or infinity in a folder's `*.safetensors` files, as 'file: tensor'; else None."""
    import torch
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return f"{path}: {key}"
    return None


def nonfinite_parameter(model) -> str | None:
    """The name of the first parameter of a loaded model holding NaN or infinity; else None."""
    import torch

    for name, param in model.named_parameters() if model is not None else ():
        if param.is_floating_point() and not param.is_meta and not bool(torch.isfinite(param).all()):
            return name
    return None
