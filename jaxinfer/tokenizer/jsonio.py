"""Read a JSON object file from a Hugging Face checkpoint folder, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxinfer.errors import CheckpointError


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data
