"""TrainCheckpointer: universal restore across meshes, exact resume of a training run,
integrity errors, retention, the host-memory tier, and kill -9 / SIGTERM / atexit faults in a
subprocess (tests/train/ckpt_worker.py) on 8 fake CPU devices."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.model.params import init_params
from jaxinfer.parallel.sharding import ShardingRules, make_mesh
from jaxinfer.train.checkpoint import CheckpointConfig, TrainCheckpointer
from tests.train import ckpt_worker

REPO = Path(__file__).resolve().parents[2]
CFG = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                  max_position_embeddings=256)
OPTIMIZER = optax.adamw(3e-3)
TOKENS, STEPS, SAVED = 32, 6, 3


@flax.struct.dataclass
class _State:
    step: Any
    params: Any
    opt_state: Any
    rng: Any
    data_position: Any


def _shardings(mesh: jax.sharding.Mesh) -> _State:
    """Params by the rules table, Adam's moments like the params, scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = ShardingRules().param_shardings(CFG, mesh)
    abstract_opt = jax.eval_shape(OPTIMIZER.init, init_params(CFG))
    opt = optax.tree_map_params(OPTIMIZER, lambda _, s: s, abstract_opt, params,
                                transform_non_params=lambda _: replicated)
    return _State(replicated, params, opt, replicated, replicated)


def _abstract(state: _State, mesh: jax.sharding.Mesh) -> _State:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, _shardings(mesh))


def _initial_state(mesh: jax.sharding.Mesh) -> _State:
    params = init_params(CFG, seed=1, scale=0.3)
    state = _State(jnp.int32(0), params, OPTIMIZER.init(params),
                   jax.random.key_data(jax.random.key(0)), jnp.int32(0))
    return jax.device_put(state, _shardings(mesh))


def _batch(position: int) -> tuple[np.ndarray, np.ndarray]:
    """The tokens at a data position and their next-token targets."""
    tokens = np.random.default_rng(position).integers(0, CFG.vocab_size, TOKENS + 1)
    return tokens[:-1].astype(np.int32), tokens[1:].astype(np.int32)


def _loss(params: Any, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """Next-token cross-entropy of a residual stack of the model's MLPs (no attention: the
    tensor-parallel matmuls and their all-reduces, at a fraction of the forward's compile)."""
    T, F = TOKENS, CFG.intermediate_size
    x = params.embed[tokens]  # [T, D]
    for layer in range(CFG.num_layers):
        gate_up = jnp.einsum("td,fd->tf", x, params.layers.w_gate_up[layer]).reshape(T, F, 2)
        hidden = jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1]  # [T, F]
        x = x + jnp.einsum("tf,df->td", hidden, params.layers.w_down[layer])
    logp = jax.nn.log_softmax(jnp.einsum("td,vd->tv", x, params.lm_head))  # [T, V]
    return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], axis=1))


def _step(state: _State, tokens: jax.Array, targets: jax.Array) -> tuple[_State, jax.Array]:
    loss, grads = jax.value_and_grad(_loss)(state.params, tokens, targets)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int and float
        updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, data_position=state.data_position + 1), loss


@functools.cache
def _train_step(mesh: jax.sharding.Mesh) -> Any:
    # Fixed output shardings: a resumed run feeds the same layouts into the same executable.
    return jax.jit(_step, out_shardings=(_shardings(mesh), NamedSharding(mesh, PartitionSpec())))


def _train(state: _State, until: int, ckpt: TrainCheckpointer | None = None) -> tuple[
        _State, list[float]]:
    losses = []
    while int(state.step) < until:
        mesh = state.step.sharding.mesh
        state, loss = _train_step(mesh)(state, *_batch(int(state.data_position)))
        losses.append(float(loss))
        if ckpt is not None:
            ckpt.maybe_save(int(state.step), state)
    return state, losses


def _assert_bitwise(got: Any, want: Any) -> None:
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert got_tree == want_tree
    for i, (a, b) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and np.array_equal(a, b), f"leaf {i} differs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """6 steps on an 8-way tensor-parallel mesh, saved every 3: (dir, losses, step-3 state)."""
    directory = tmp_path_factory.mktemp("trained") / "ckpt"
    mesh = make_mesh(1, 8)
    with TrainCheckpointer(directory, save_every=SAVED, keep=None) as ckpt:
        state, losses = _train(_initial_state(mesh), SAVED, ckpt)
        saved = jax.tree.map(np.array, state)
        _, more = _train(state, STEPS, ckpt)
    assert ckpt.last_save is not None and ckpt.last_save.blocked_s < 5
    return directory, losses + more, saved


@pytest.mark.parametrize("data,tensor", [(2, 4), (4, 2), (1, 1)])
def test_restore_onto_another_mesh_is_bitwise(trained, data: int, tensor: int) -> None:
    directory, _, saved = trained
    mesh = make_mesh(data, tensor, devices=jax.devices()[: data * tensor])
    with TrainCheckpointer(directory) as ckpt:
        assert ckpt.all_steps() == [SAVED, STEPS]
        restored = ckpt.restore(SAVED, _abstract(saved, mesh))
    _assert_bitwise(restored, saved)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(_shardings(mesh)),
                              strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    wqkv = restored.params.layers.wqkv
    assert {s.data.shape[1] for s in wqkv.addressable_shards} == {wqkv.shape[1] // tensor}


def test_resume_on_the_same_mesh_repeats_the_losses_bitwise(trained) -> None:
    directory, losses, saved = trained
    mesh = make_mesh(1, 8)
    with TrainCheckpointer(directory) as ckpt:
        state = ckpt.restore(SAVED, _abstract(saved, mesh))
    _, resumed = _train(state, STEPS)
    assert resumed == losses[SAVED:]


def test_resume_on_another_mesh_matches_the_losses(trained) -> None:
    directory, losses, saved = trained
    with TrainCheckpointer(directory) as ckpt:
        state = ckpt.restore_latest(_abstract(saved, make_mesh(2, 4)))
        assert int(state.step) == STEPS
        state = ckpt.restore(SAVED, _abstract(saved, make_mesh(2, 4)))
    _, resumed = _train(state, STEPS)
    np.testing.assert_allclose(resumed, losses[SAVED:], rtol=1e-5, atol=0)


# ---------------------------------------------------------------------- small-state tests
def _small_state(value: float = 1.0) -> dict[str, Any]:
    mesh = make_mesh(1, 8)
    w = jax.device_put(jnp.arange(64 * 256, dtype=jnp.float32).reshape(64, 256) * value,
                       NamedSharding(mesh, PartitionSpec(None, "tensor")))
    return {"w": w, "b": jnp.full((7,), value, jnp.bfloat16), "step": jnp.int32(int(value)),
            "rng": jnp.array([1, 2], jnp.uint32), "mask": jnp.array([True, False])}


def _like(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def test_policy_retention_and_close(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="save_every"):
        CheckpointConfig(save_every=0)
    ckpt = TrainCheckpointer(tmp_path, save_every=2, keep=2)
    saved = [ckpt.maybe_save(step, _small_state(step)) for step in range(1, 6)]
    assert saved == [False, True, False, True, False]
    assert ckpt.maybe_save(5, _small_state(5), force=True)
    assert not ckpt.maybe_save(5, _small_state(5), force=True)  # already saved
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5
    _assert_bitwise(ckpt.restore_latest(_like(_small_state())), _small_state(5))
    ckpt.close()
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.maybe_save(8, _small_state(8))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_no_compression_by_default(tmp_path: Path) -> None:
    zeros = {"z": jnp.zeros((512, 1024), jnp.float32)}  # 2 MiB, compresses to almost nothing
    for name, compress in (("plain", False), ("zstd", True)):
        with TrainCheckpointer(tmp_path / name, compress=compress) as ckpt:
            ckpt.maybe_save(0, zeros)
    assert _dir_bytes(tmp_path / "plain") > 2 * 2**20 > 20 * _dir_bytes(tmp_path / "zstd")


# ------------------------------------------------------------------------------ integrity
@pytest.fixture
def two_steps(tmp_path: Path):
    ckpt = TrainCheckpointer(tmp_path, save_every=1, keep=None)
    ckpt.maybe_save(1, _small_state(1))
    ckpt.maybe_save(2, _small_state(2))
    ckpt.wait()
    yield ckpt, tmp_path
    ckpt.close()


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> None:
    path = _largest_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(step_dir: Path) -> None:
    path = _largest_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated data file": (_truncate, r"step 2 .* tensor 'w' could not be read .*OUT_OF_RANGE"),
    "flipped byte": (_flip, r"step 2 .* tensor 'w' does not match its checksum"),
    "deleted manifest": (lambda d: (d / "manifest" / "manifest.json").unlink(),
                         r"step 2 .* manifest .*manifest.json is missing"),
    "deleted array dir": (lambda d: shutil.rmtree(d / "state"),
                          r"step 2 .* array directory .*state is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_refused_by_name(two_steps, damage: str) -> None:
    ckpt, directory = two_steps
    corrupt, message = DAMAGE[damage]
    corrupt(directory / "2")
    with pytest.raises(CheckpointError, match=message):
        ckpt.restore_latest(_like(_small_state()))
    _assert_bitwise(ckpt.restore(1, _like(_small_state())), _small_state(1))


def test_mismatching_tree_is_refused(two_steps) -> None:
    ckpt, _ = two_steps
    target = _like(_small_state())
    target["w"] = jax.ShapeDtypeStruct((256, 64), jnp.float32)
    target["extra"] = jax.ShapeDtypeStruct((3,), jnp.float32)
    del target["mask"]
    with pytest.raises(CheckpointError, match=r"step 2 .*'extra' is not in the checkpoint; "
                       r"checkpoint tensor 'mask' is not in the target .*'w' is float32\[64, "
                       r"256\] in the checkpoint, float32\[256, 64\]"):
        ckpt.restore(2, target)


def test_uncommitted_save_is_never_listed(tmp_path: Path) -> None:
    with TrainCheckpointer(tmp_path / "src") as ckpt:
        ckpt.maybe_save(0, _small_state())
    ckpt = TrainCheckpointer(tmp_path / "ckpt")
    # What kill -9 leaves behind: a complete-looking step that was never renamed.
    tmp = tmp_path / "ckpt" / "5.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "src" / "0", tmp)
    assert ckpt.all_steps() == [] and ckpt.latest_step() is None
    assert ckpt.restore_latest(_like(_small_state())) is None
    with pytest.raises(CheckpointError, match=r"step 5 .* interrupted .*5.orbax-checkpoint-tmp"):
        ckpt.restore(5, _like(_small_state()))
    ckpt.close()
    TrainCheckpointer(tmp_path / "ckpt").close()  # a restart removes the leftover
    assert not tmp.exists()


# ------------------------------------------------------------------------ host-memory tier
def test_memory_tier_recovers_after_a_failing_step(tmp_path: Path) -> None:
    step_fn = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    state = {"w": _small_state()["w"], "n": jnp.int32(0)}
    with TrainCheckpointer(tmp_path, save_every=1000, memory_every=2) as ckpt:
        assert ckpt.recover_in_memory() is None
        for step in range(1, 6):
            state = step_fn(state)  # donates: the snapshot must not alias these buffers
            if step == 5:
                break  # the step "failed": its input is gone, its output is not trusted
            ckpt.maybe_save(step, state)
        for _ in range(2):  # recovering twice gives the same state (fresh device copies)
            snapshot = ckpt.recover_in_memory()
            assert snapshot.step == 4
            want = {"w": np.asarray(_small_state()["w"]) + 4, "n": np.int32(4)}
            _assert_bitwise(snapshot.state, want)
            assert snapshot.state["w"].sharding == state["w"].sharding
            step_fn(snapshot.state)
        assert ckpt.all_steps() == [] and not any(tmp_path.iterdir())


# --------------------------------------------------------------------- subprocess faults
WORKER_STEPS = 14


@pytest.fixture
def workers():
    """Worker processes started by a test; any still running at its end are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _launch(workers: list, directory: Path, log: Path, *extra: str) -> subprocess.Popen:
    with open(log.with_suffix(".stderr"), "wb") as stderr:  # the child keeps its own handle
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "tests.train.ckpt_worker", str(directory), "--log", str(log),
             "--steps", str(WORKER_STEPS), *extra],
            cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=stderr))
    return workers[-1]


def _log(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _wait_for_saves(proc: subprocess.Popen, log: Path, saves: int) -> None:
    deadline = time.monotonic() + 120
    while sum(line.startswith("saving ") for line in _log(log)) < saves:
        if proc.poll() is not None:
            pytest.fail(f"worker exited {proc.returncode}: "
                        f"{log.with_suffix('.stderr').read_text()[-3000:]}")
        assert time.monotonic() < deadline, "worker too slow"
        time.sleep(0.001)


def _tmp_steps(directory: Path) -> set[int]:
    return {int(p.name.split(".")[0]) for p in directory.glob("*.orbax-checkpoint-tmp*")}


def test_kill_and_sigterm_resume_from_the_last_commit(tmp_path: Path, workers) -> None:
    """kill -9 after 1, 2 and 5 saves started, SIGTERM after 3, each followed by a check and
    a restart that must resume from the last commit; then a run that ends without close()
    (the atexit hook must commit its last save)."""
    reference = ckpt_worker.run_steps(WORKER_STEPS)
    abstract = ckpt_worker.abstract_state()
    directory = tmp_path / "ckpt"
    committed: dict[int, str] = {}  # step -> fingerprint, as logged after each commit
    last_commit, in_flight = 0, 0
    points = [(signal.SIGKILL, 1), (signal.SIGKILL, 2), (signal.SIGTERM, 3),
              (signal.SIGKILL, 5)]
    for run, (sig, saves) in enumerate(points):
        log = tmp_path / f"run{run}.log"
        proc = _launch(workers, directory, log, "--sleep", "0.05")
        _wait_for_saves(proc, log, saves)
        in_flight += bool(_tmp_steps(directory))
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == -sig
        lines = _log(log)
        assert lines[0] == f"resumed {last_commit}"
        committed.update((int(s), fp) for _, s, fp in
                         (line.split() for line in lines if line.startswith("committed")))
        on_disk = ocp.step.checkpoint_steps(directory)
        assert not _tmp_steps(directory) & set(on_disk), "an interrupted save is listed"
        if sig == signal.SIGTERM:  # the in-flight save was awaited: nothing left half-done
            started = max(int(line.split()[1]) for line in lines if line.startswith("saving"))
            assert not _tmp_steps(directory) and max(on_disk) >= started
        with TrainCheckpointer(directory, handle_sigterm=False) as ckpt:
            assert not _tmp_steps(directory)  # a restart removes the leftovers
            latest = ckpt.latest_step()
            assert (latest or 0) >= max(committed, default=0)
            state = None if latest is None else ckpt.restore_latest(abstract)
        if latest is not None:
            _assert_bitwise(state, reference[latest])
            fingerprint = ckpt_worker.fingerprint(reference[latest])
            assert committed.get(latest, fingerprint) == fingerprint
        last_commit = latest or 0
    log = tmp_path / "final.log"
    proc = _launch(workers, directory, log, "--no-close", "--sleep", "0")
    assert proc.wait(timeout=120) == 0, log.with_suffix(".stderr").read_text()[-3000:]
    assert _log(log)[0] == f"resumed {last_commit}" and _log(log)[-1] == f"done {WORKER_STEPS}"
    with TrainCheckpointer(directory, handle_sigterm=False) as ckpt:
        assert ckpt.latest_step() == WORKER_STEPS
        _assert_bitwise(ckpt.restore_latest(abstract), reference[WORKER_STEPS])
    assert in_flight >= 1, "no kill landed while a save was in flight"
    print(f"{len(points)} kill points, {in_flight} with a save in flight, all resumed")
