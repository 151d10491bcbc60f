"""`jaxinfer eval-kv` on the real SmolLM2-135M at tiny sizes: the CLI writes one JSON line
per measurement and the table, and text windows decoded as one batch score exactly what
they score one at a time."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jaxinfer.cli import main as cli_main
from jaxinfer.kvcompress.evaluate import EvalKVConfig, run
from tests.models import smollm2_path

TINY = dict(context=192, text_windows=2, text_decode=8, budgets=(0.25,), extra=(),
            passkey_contexts=(160,), passkey_depths=(0.5,), agreement_prompts=2,
            agreement_prompt_len=48, agreement_new_tokens=4, agreement_batch=2)


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(smollm2_path())


def test_batched_text_windows_equal_one_at_a_time(model_path):
    base = dataclasses.replace(EvalKVConfig(), model=model_path, policies=("full", "h2o", "int8"),
                               parts=("text",), **TINY)
    rows = {}
    for batch in (1, 2):
        got: list[dict] = []
        run(dataclasses.replace(base, text_batch=batch), got.append)
        rows[batch] = {r["policy"]: r for r in got}
    assert set(rows[1]) == {"full", "h2o@0.25", "int8"}
    for label, r in rows[1].items():
        b = rows[2][label]
        assert r["tokens"] == b["tokens"] == 2 * TINY["text_decode"]
        assert b["ppl"] == pytest.approx(r["ppl"], rel=1e-4), label
        assert b["kl"] == pytest.approx(r["kl"], abs=1e-5), label
        assert b["kv_bytes"] == r["kv_bytes"], label
    assert rows[1]["full"]["ppl_delta_pct"] == 0.0
    assert rows[1]["h2o@0.25"]["kv_ratio"] < 0.5  # the budget really shrank the state


def test_cli_writes_json_lines_and_table(model_path, tmp_path, capsys):
    out = tmp_path / "kv.jsonl"
    rc = cli_main(["eval-kv", "--model", model_path, "--policies", "full,streaming",
                   "--budgets", "0.5", "--context", "192", "--text-windows", "1",
                   "--text-decode", "8", "--passkey-contexts", "160",
                   "--agreement-prompts", "2", "--output", str(out)])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    parts = {(r["part"], r["policy"]) for r in lines}
    assert {("text", "full"), ("text", "streaming@0.5"), ("agreement", "streaming@0.5")} <= parts
    assert any(r["part"] == "passkey" for r in lines)
    err = capsys.readouterr().err
    assert "| streaming@0.5 |" in err and "ppl" in err


def test_summary_of_a_partial_run():
    """A text-only run (no agreement lines) still tabulates its text columns."""
    from jaxinfer.kvcompress.evaluate import summarize

    rows = [{"part": "text", "policy": p, "kv_ratio": r, "ppl": 10.0 * (1 + d / 100),
             "ppl_delta_pct": d, "kl": 0.1, "top1": 0.9} for p, r, d in
            (("full", 1.0, 0.0), ("h2o@0.25", 0.25, 3.5))]
    table = summarize(rows)
    assert "| h2o@0.25 | 0.250 | 10.350 | +3.50 | 0.1000 | 0.900 | n/a |  |" in table
    rows.append({"part": "agreement", "policy": "h2o@0.25", "token_agreement": 0.5})
    assert "| h2o@0.25 | 0.250 | 10.350 | +3.50 | 0.1000 | 0.900 | n/a | 0.500 |" in summarize(rows)
