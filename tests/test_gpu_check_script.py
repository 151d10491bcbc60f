"""scripts/gpu_check.py in --smoke mode: tiny shapes, Pallas in interpret mode on CPU.

Keeps the GPU script runnable between the rare sessions that have a GPU: every part must
produce its result rows (no error rows), and the kernels' outputs must agree with XLA's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path: Path) -> None:
    out = tmp_path / "smoke.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    parts = {r["part"] for r in rows}
    assert {"meta", "peaks", "decode_attention", "decode_attention_check", "prefill_attention",
            "e2e_decode", "summary"} <= parts
    systems = {(r["part"], r.get("system")) for r in rows}
    for needed in [("decode_attention", "pallas"), ("decode_attention", "xla"),
                   ("prefill_attention", "pallas"), ("prefill_attention", "xla"),
                   ("e2e_decode", "jaxinfer-xla"), ("e2e_decode", "jaxinfer-pallas_gpu"),
                   ("e2e_decode", "hf-transformers")]:
        assert needed in systems, needed
    for r in rows:
        if r["part"] == "decode_attention_check":
            assert r["max_abs_err"] < 2e-2  # bf16 outputs
    assert any("pallas/xla" in line for line in rows[-1]["bars"])


def test_gpu_check_refuses_cpu_without_smoke() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0 and "--smoke" in proc.stderr
