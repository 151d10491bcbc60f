"""Universal checkpoints with the real training step: save on one mesh, resume on another.

The model's `train_step` (full fine-tuning, AdamW) runs 8-way tensor parallel on fake CPU
devices; a `TrainCheckpointer` saves at step 2; resuming on the same mesh continues the loss
curve bitwise, resuming on 2x4 (data x tensor) or on one device restores the state bitwise
and continues within 1e-5 relative.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxinfer.model.params import init_params
from jaxinfer.parallel.sharding import make_mesh
from jaxinfer.train.checkpoint import TrainCheckpointer
from jaxinfer.train.data import ByteTokenizer, load_train_data
from jaxinfer.train.loop import tiny_model_config
from jaxinfer.train.step import (
    OptimizerConfig,
    abstract_train_state,
    batch_sharding,
    init_train_state,
    make_optimizer,
    make_train_step,
    train_state_shardings,
)

SEQ_LEN, BATCH, STEPS, SAVE_AT = 32, 4, 4, 2
OPTIMIZER = OptimizerConfig(lr=3e-3, warmup_steps=1, decay_steps=20, weight_decay=0.01)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_model_config("tiny", ByteTokenizer.vocab_size)
    data = load_train_data("bible", ByteTokenizer(), seq_len=SEQ_LEN, seed=0, max_documents=8)
    return cfg, data, make_optimizer(OPTIMIZER), make_train_step(cfg, OPTIMIZER)


def _run(setup, state, mesh, first: int, last: int):
    """Steps first..last (1-based) on `mesh`; returns the state and the losses."""
    cfg, data, _, step_fn = setup
    losses = []
    for step in range(first, last + 1):
        batch = jax.device_put(data.train.batch_at(step - 1, BATCH), batch_sharding(mesh))
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_resume_on_other_meshes(setup, tmp_path):
    cfg, _, optimizer, _ = setup
    mesh = make_mesh(1, 8)
    shardings = train_state_shardings(cfg, optimizer, mesh)

    def fresh():
        state = init_train_state(init_params(cfg, seed=0, scale=0.1), optimizer, seed=0)
        return jax.device_put(state, shardings)

    _, straight = _run(setup, fresh(), mesh, 1, STEPS)

    with TrainCheckpointer(tmp_path, save_every=SAVE_AT, keep=2) as ckpt:
        state, _ = _run(setup, fresh(), mesh, 1, SAVE_AT)
        ckpt.maybe_save(SAVE_AT, state, force=True)
        saved = _leaves(state)
    for data_, tensor in [(1, 8), (2, 4), (1, 1)]:
        target = make_mesh(data_, tensor, devices=jax.devices()[:data_ * tensor])
        abstract = abstract_train_state(cfg, optimizer, None,
                                        train_state_shardings(cfg, optimizer, target))
        with TrainCheckpointer(tmp_path, save_every=100) as ckpt:
            restored = ckpt.restore_latest(abstract)
        assert int(restored.step) == SAVE_AT and int(restored.data_position) == SAVE_AT
        for a, b in zip(_leaves(restored), saved, strict=True):
            np.testing.assert_array_equal(a, b)
        _, resumed = _run(setup, restored, target, SAVE_AT + 1, STEPS)
        if (data_, tensor) == (1, 8):
            assert resumed == straight[SAVE_AT:]  # bitwise on the same mesh
        else:
            np.testing.assert_allclose(resumed, straight[SAVE_AT:], rtol=1e-5, atol=0,
                                       err_msg=f"resumed on {data_}x{tensor}")
