"""Training: packing, the masked loss, forward parity with inference, full and LoRA steps,
clipping, sharding of the state, resume through a checkpointer, and the CLI.

A 2-layer width-64 random model on UTF-8 bytes of the King James Bible keeps every compiled
program small; tests that train share jitted steps (they are cached per model and optimizer
settings), so the suite compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxinfer.batch import SequenceChunk, build_step_batch
from jaxinfer.cache.paged import init_cache
from jaxinfer.cli import main
from jaxinfer.model.params import init_params
from jaxinfer.model.transformer import Batch, forward
from jaxinfer.parallel.sharding import ShardingRules, make_mesh
from jaxinfer.train.data import (
    ByteTokenizer,
    PackedDataset,
    load_train_data,
    pack_documents,
    read_bible,
    tokenize_documents,
)
from jaxinfer.train.loop import TrainConfig, load_tokenizer, run_training, tiny_model_config
from jaxinfer.train.lora import LoraConfig, apply_lora, count_params, init_lora, merge_lora
from jaxinfer.train.step import (
    OptimizerConfig,
    TrainState,
    abstract_train_state,
    init_train_state,
    make_optimizer,
    make_train_step,
    masked_next_token_loss,
    packed_logits,
    train_state_shardings,
)

SEQ_LEN, BATCH = 64, 4
OPTIMIZER = OptimizerConfig(lr=3e-3, warmup_steps=2, decay_steps=20, weight_decay=0.01)
# A 3-step run on OPTIMIZER's schedule: every training test shares one compiled full step.
RUN_FLAGS = ["--tiny", "--tokenizer", "bytes", "--steps", "3", "--decay-steps", "20",
             "--lr", "3e-3", "--warmup-steps", "2", "--batch-size", str(BATCH),
             "--seq-len", str(SEQ_LEN), "--max-documents", "12", "--eval-every", "2",
             "--eval-batches", "1", "--quiet"]
RUN_CONFIG = TrainConfig(tiny="tiny", tokenizer="bytes", steps=3, decay_steps=20, lr=3e-3,
                         warmup_steps=2, batch_size=BATCH, seq_len=SEQ_LEN, max_documents=12,
                         eval_every=2, eval_batches=1, progress=False)


@pytest.fixture(scope="module")
def cfg():
    return tiny_model_config("tiny", ByteTokenizer.vocab_size)


@pytest.fixture(scope="module")
def data():
    return load_train_data("bible", ByteTokenizer(), seq_len=SEQ_LEN, seed=0, max_documents=12)


@pytest.fixture(scope="module")
def logits_fn(cfg):
    return jax.jit(lambda params, tokens, segments: packed_logits(params, cfg, tokens, segments))


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ------------------------------------------------------------------------------- data


def test_packing_round_trip_and_segments():
    rng = np.random.default_rng(0)
    documents = [rng.integers(1, 100, n).astype(np.int32) for n in (5, 1, 30, 16, 2, 9, 17)]
    rows = pack_documents(documents, row_len=16)
    real = rows.segment_ids > 0
    np.testing.assert_array_equal(rows.tokens[real], np.concatenate(documents))
    for segments in rows.segment_ids:
        n = int(np.count_nonzero(segments))
        assert not segments[n:].any(), "padding only at a row's tail"
        steps = np.diff(segments[:n])
        assert segments[0] == 1 and set(steps.tolist()) <= {0, 1}
    # Documents continue across rows (the 30-token one spans three); a row is cut short
    # only where a single free slot could hold no target (row 3: 15 tokens, then 17 more).
    assert rows.num_tokens == sum(len(d) for d in documents)
    np.testing.assert_array_equal(real.sum(axis=1), [16, 16, 16, 15, 16, 1])


def test_batch_at_is_deterministic_and_covers_each_epoch(data):
    stream = data.train
    again = PackedDataset(stream.rows, seed=0)
    for position in (0, 7, 1000):
        a, b = stream.batch_at(position, BATCH), again.batch_at(position, BATCH)
        assert set(a) == {"tokens", "segment_ids"}
        assert a["tokens"].shape == (BATCH, SEQ_LEN + 1) and a["tokens"].dtype == np.int32
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])
    assert not np.array_equal(stream.batch_at(0, BATCH)["tokens"],
                              PackedDataset(stream.rows, seed=1).batch_at(0, BATCH)["tokens"])
    # One epoch of single-row batches visits every row once.
    rows = np.stack([stream.batch_at(i, 1)["tokens"][0] for i in range(stream.num_rows)])
    assert sorted(map(bytes, rows)) == sorted(map(bytes, stream.rows.tokens))


def test_held_out_split(data):
    total = sum(len(d) for d in tokenize_documents(read_bible(12), ByteTokenizer()))
    assert data.num_eval_documents == 1
    assert data.train.rows.num_tokens + data.eval.rows.num_tokens == total
    again = load_train_data("bible", ByteTokenizer(), seq_len=SEQ_LEN, seed=0, max_documents=12)
    np.testing.assert_array_equal(again.eval.rows.tokens, data.eval.rows.tokens)


@pytest.mark.slow
def test_bible_with_the_smollm2_tokenizer():
    tokenizer = load_tokenizer(None)
    chapters = read_bible(3)
    documents = tokenize_documents(chapters, tokenizer)
    rows = pack_documents(documents, row_len=129)
    stream = rows.tokens[rows.segment_ids > 0]
    np.testing.assert_array_equal(stream, np.concatenate(documents))
    assert all(d[-1] == tokenizer.eos_token_id for d in documents)
    assert tokenizer.decode(documents[0][:-1].tolist()) == chapters[0]


# ------------------------------------------------------------------------------- loss


def test_masked_loss_matches_numpy_on_a_hand_checked_case():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((1, 5, 7)).astype(np.float32)
    tokens = np.array([[3, 1, 4, 1, 5, 0]], np.int32)
    segments = np.array([[1, 1, 1, 2, 2, 0]], np.int32)
    # Targets: 0->1 and 1->2 (segment 1), 3->4 (segment 2); not 2->3 (boundary), 4->5 (pad).
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -sum(log_probs[0, t, tokens[0, t + 1]] for t in (0, 1, 3))
    total, count = masked_next_token_loss(jnp.asarray(logits), jnp.asarray(tokens),
                                          jnp.asarray(segments))
    assert int(count) == 3
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)


def test_training_forward_equals_inference_forward(cfg, logits_fn):
    params = init_params(cfg, seed=3, scale=0.2)
    rng = np.random.default_rng(2)
    rows = [[11, 7, 5], [20, 9, 35], [64], []]  # document lengths per row; the rest: padding
    tokens = np.zeros((BATCH, SEQ_LEN), np.int32)
    segments = np.zeros((BATCH, SEQ_LEN), np.int32)
    documents = []
    for r, lengths in enumerate(rows):
        offset = 0
        for s, n in enumerate(lengths):
            doc = rng.integers(0, cfg.vocab_size, n).astype(np.int32)
            tokens[r, offset:offset + n], segments[r, offset:offset + n] = doc, s + 1
            documents.append((r, offset, doc))
            offset += n
    train_logits = np.asarray(logits_fn(params, tokens, segments))

    page_size, pages_per_doc = 16, 4
    chunks = [SequenceChunk(doc.tolist(), 0, list(range(i * pages_per_doc,
                                                        (i + 1) * pages_per_doc)))
              for i, (_, _, doc) in enumerate(documents)]
    num_pages = pages_per_doc * len(chunks)
    step = build_step_batch(chunks, page_size=page_size, num_slots=num_pages * page_size)
    # Both inference attention paths: the one build_step_batch picks by cost (paged here),
    # and the flat prefix-free one the training forward uses.
    assert not step.flat_prefill
    flat = dataclasses.replace(step, flat_prefill=True)
    assert flat.prefix_free
    run = jax.jit(forward, static_argnums=1, static_argnames="all_logits")
    for batch in (step, flat):
        cache = init_cache(cfg, num_pages, page_size)
        infer_logits = np.asarray(run(params, cfg, Batch.from_step(batch), cache,
                                      all_logits=True)[0])
        for s, (r, offset, doc) in enumerate(documents):
            start = int(step.query_start[s])
            np.testing.assert_allclose(train_logits[r, offset:offset + len(doc)],
                                       infer_logits[start:start + len(doc)], atol=2e-5,
                                       rtol=1e-4)


# ------------------------------------------------------------------------- full training


def _run_steps(cfg, params, data, steps):
    step_fn = make_train_step(cfg, OPTIMIZER)
    state = init_train_state(params, make_optimizer(OPTIMIZER), seed=0)
    history = []
    for _ in range(steps):
        state, metrics = step_fn(state, data.train.batch_at(int(state.data_position), BATCH))
        history.append(jax.device_get(metrics))
    return state, history


def test_loss_decreases_on_packed_bible_text(cfg, data):
    state, history = _run_steps(cfg, init_params(cfg, seed=0), data, 20)
    losses = [float(m["loss"]) for m in history]
    assert losses[0] == pytest.approx(np.log(cfg.vocab_size), abs=0.2)
    assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
    assert int(state.step) == 20 and int(state.data_position) == 20
    assert all(int(m["tokens"]) > 0 for m in history)
    lrs = [float(m["learning_rate"]) for m in history]
    assert lrs[0] == pytest.approx(OPTIMIZER.lr / 3) and max(lrs) == pytest.approx(OPTIMIZER.lr)
    assert lrs[-1] < lrs[5]


def test_train_step_is_deterministic(cfg, data):
    first, metrics_a = _run_steps(cfg, init_params(cfg, seed=0), data, 3)
    second, metrics_b = _run_steps(cfg, init_params(cfg, seed=0), data, 3)
    assert _leaves_equal(first, second)
    assert _leaves_equal(metrics_a, metrics_b)
    assert not np.array_equal(np.asarray(first.rng), np.asarray(
        init_train_state({}, optax.identity(), seed=0).rng))


def test_clipping_caps_the_gradient_adam_sees():
    config = OptimizerConfig(clip_norm=0.5, weight_decay=0.0)
    params = {"w": jnp.ones((3, 4), jnp.float32)}
    optimizer = make_optimizer(config)
    update = jax.jit(optimizer.update)
    with jax.numpy_dtype_promotion("standard"):
        for scale, expected_norm in ((100.0, 0.5), (0.01, None)):
            grads = {"w": jnp.full((3, 4), scale, jnp.float32)}
            norm = float(optax.tree.norm(grads))
            _, state = update(grads, optimizer.init(params), params)
            (adam,) = [s for s in jax.tree.leaves(
                state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState)]
            seen = float(optax.tree.norm(adam.mu)) / (1 - config.adam_b1)
            assert seen == pytest.approx(expected_norm or norm, rel=1e-5)


# -------------------------------------------------------------------------------- LoRA


def test_lora_trains_adapters_only_and_merges(cfg, data, logits_fn):
    lora_cfg = LoraConfig(rank=4, alpha=8.0)
    base = init_params(cfg, seed=0)
    base_copy = jax.tree.map(np.array, base)
    adapters = init_lora(cfg, lora_cfg, seed=1)
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    qkv, heads = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.num_heads * cfg.head_dim
    assert count_params(adapters) == L * 4 * ((D + qkv) + (heads + D) + (D + 2 * F) + (F + D))
    state = init_train_state(adapters, make_optimizer(OPTIMIZER), frozen=base, seed=0)
    step_fn = make_train_step(cfg, OPTIMIZER, lora_cfg)
    batch = data.train.batch_at(0, BATCH)
    tokens, segments = batch["tokens"][:, :-1], batch["segment_ids"][:, :-1]
    base_logits = np.asarray(logits_fn(base, tokens, segments))
    total, count = masked_next_token_loss(base_logits, batch["tokens"], batch["segment_ids"])
    losses = []
    for _ in range(5):
        state, metrics = step_fn(state, data.train.batch_at(int(state.data_position), BATCH))
        losses.append(float(metrics["loss"]))
    # B starts at zero: the first loss is the base model's. (The step donated `base`.)
    assert losses[0] == pytest.approx(float(total) / int(count), rel=1e-6)
    assert losses[-1] < losses[0]
    assert _leaves_equal(state.frozen, base_copy)
    assert float(jnp.abs(state.params.wo.b).max()) > 0
    # Merged weights run the same function as adapters applied inside the step.
    merged = merge_lora(state.frozen, state.params, lora_cfg)
    applied = apply_lora(state.frozen, state.params, lora_cfg)
    merged_logits = np.asarray(logits_fn(merged, tokens, segments))
    np.testing.assert_allclose(merged_logits, np.asarray(logits_fn(applied, tokens, segments)),
                               atol=1e-6, rtol=1e-6)
    assert not np.allclose(merged_logits, base_logits)


# ---------------------------------------------------------------------------- sharding


def test_train_state_shardings_follow_the_rules(cfg):
    assert RUN_CONFIG.optimizer_config() == OPTIMIZER
    mesh = make_mesh(data=4, tensor=2)
    optimizer = make_optimizer(OPTIMIZER)
    shardings = train_state_shardings(cfg, optimizer, mesh)
    wqkv = ShardingRules().param_shardings(cfg, mesh).layers.wqkv
    assert shardings.params.layers.wqkv == wqkv and wqkv.spec[1] == "tensor"
    adam = shardings.opt_state[1][0]
    assert adam.mu.layers.wqkv == wqkv and adam.nu.layers.wqkv == wqkv
    assert adam.count.spec == jax.sharding.PartitionSpec() and shardings.frozen is None
    abstract = abstract_train_state(cfg, optimizer, shardings=shardings)
    state = jax.device_put(init_train_state(init_params(cfg), optimizer), shardings)
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
        assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)

    lora_cfg = LoraConfig(rank=4)
    lora = train_state_shardings(cfg, optimizer, mesh, lora_cfg)
    assert lora.params.wqkv.b.spec[1] == "tensor" and lora.params.wqkv.a.spec[1] is None
    assert lora.frozen.layers.wqkv == wqkv and lora.opt_state[1][0].mu.wqkv.b == lora.params.wqkv.b


# ------------------------------------------------------------------- run loop and CLI


class MemoryCheckpointer:
    """The `Checkpointer` protocol over host copies, saving every step."""

    def __init__(self):
        self.saved: dict[int, TrainState] = {}
        self.closed = False

    def restore_latest(self, abstract_state):
        if not self.saved:
            return None
        saved = self.saved[max(self.saved)]
        assert jax.tree.structure(saved) == jax.tree.structure(abstract_state)
        for a, x in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(saved), strict=True):
            assert (a.shape, a.dtype) == (x.shape, x.dtype)
        return jax.tree.map(jnp.asarray, saved)

    def maybe_save(self, step, state, force=False):
        self.saved[step] = jax.device_get(state)

    def wait(self):
        pass

    def close(self):
        self.closed = True


class Interrupt(Exception):
    pass


def test_resume_continues_the_run_exactly():
    straight = run_training(RUN_CONFIG)
    checkpointer = MemoryCheckpointer()

    def crash(step, metrics):
        if step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_training(RUN_CONFIG, checkpointer=checkpointer, on_step=crash)
    assert checkpointer.closed and max(checkpointer.saved) == 2
    checkpointer.closed = False
    resumed = run_training(RUN_CONFIG, checkpointer=checkpointer)
    assert resumed.start_step == 2 and resumed.steps == 3 and checkpointer.closed
    assert _leaves_equal(resumed.state, straight.state)
    assert resumed.losses == straight.losses[2:]


def test_cli_trains_and_prints_its_config(capsys, tmp_path):
    # A LoRA run: the exported models hold the merged weights.
    ours, hf = tmp_path / "ours", tmp_path / "hf"
    assert main(["train", *RUN_FLAGS, "--lora-rank", "4", "--lora-alpha", "8",
                 "--output-dir", str(ours), "--export-hf", str(hf)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["train_config"]["steps"] == 3
    assert lines[0]["train_config"]["tiny"] == "tiny"
    assert lines[1]["trainable_params"] > 0 and lines[1]["mode"] == "lora rank 4"
    assert [line["step"] for line in lines if "eval_loss" in line] == [2, 3]
    final = next(line for line in lines if "final_loss" in line)
    assert final["steps"] == 3 and final["final_loss"] > 0
    assert [line["format"] for line in lines if "saved" in line] == ["jaxinfer-orbax",
                                                                      "huggingface"]
    # The saved model is the trained one: our folder and the HF export give the same logits.
    import torch
    from transformers import AutoModelForCausalLM

    from jaxinfer.weights.orbax_io import load_model_dir

    params, model_cfg = load_model_dir(ours)
    tokens = np.arange(1, 20, dtype=np.int32)
    step = build_step_batch([SequenceChunk(tokens.tolist(), 0, [0, 1])], page_size=16,
                            num_slots=32)
    ours_logits, _ = forward(params, model_cfg, Batch.from_step(step),
                             init_cache(model_cfg, 2, 16), all_logits=True)
    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf_model(torch.as_tensor(tokens[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(ours_logits)[:len(tokens)], hf_logits, atol=1e-4, rtol=0)
    # Training never overwrites a model.
    assert main(["train", *RUN_FLAGS, "--output-dir", str(ours)]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_refuses_bad_settings(capsys):
    assert main(["train", "--steps", "0", "--tiny"]) == 2
    assert "steps must be positive" in capsys.readouterr().err
    assert main(["train", "--tokenizer", "bytes"]) == 2
    assert "bytes tokenizer" in capsys.readouterr().err
