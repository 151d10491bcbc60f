"""Training checkpoints: asynchronous, atomic, checksummed Orbax saves of any pytree of arrays,
restorable onto any mesh, with an optional host-memory snapshot tier (docs/checkpoints.md).

The loop is blocked only while a save is launched (the state's shards are taken to the host:
zero-copy views on CPU devices, and Orbax starts its device-to-host copy); writing, the CRC32
checksums and the commit run in Orbax's background threads while the next steps compute (the
DataStates-LLM idea).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import os
import re
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.weights.orbax_io import crc32

STATE_ITEM = "state"
MANIFEST_ITEM = "manifest"
MANIFEST_FILE = "manifest.json"
FORMAT = "jaxinfer-train-checkpoint-1"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """How often and how `TrainCheckpointer` saves. Variants via `dataclasses.replace`."""

    save_every: int = 100  # persistent save when step % save_every == 0
    keep: int | None = 3  # committed steps kept on disk (None: all)
    memory_every: int = 0  # host-memory snapshot when step % memory_every == 0 (0: off)
    compress: bool = False  # zstd inside tensorstore: ~7x slower writes for ~7% smaller files
    verify: bool = True  # check every shard's CRC32 on restore
    handle_sigterm: bool = True  # wait for the in-flight save on SIGTERM, then terminate

    def __post_init__(self) -> None:
        if self.save_every < 1:
            raise ConfigError(f"save_every must be >= 1, got {self.save_every}")
        if self.keep is not None and self.keep < 1:
            raise ConfigError(f"keep must be >= 1 or None (keep all), got {self.keep}")
        if self.memory_every < 0:
            raise ConfigError(f"memory_every must be >= 0 (0: off), got {self.memory_every}")


class Snapshot(NamedTuple):
    """A state and the step it belongs to (`recover_in_memory`)."""

    step: int
    state: Any


class SaveTiming(NamedTuple):
    """Seconds the caller spent in one persistent save."""

    step: int
    waited_s: float  # waiting for the previous save to finish (back-pressure)
    blocked_s: float  # launching this save: host views of the shards, Orbax's launch


# ------------------------------------------------------------------- host pieces and CRC32
# Each leaf is taken to the host as one piece per distinct shard (replica 0), keyed by the
# shard's (start, stop) per dimension. The pieces feed both the checksums, computed with
# zlib.crc32 in Orbax's commit thread (~1 GiB/s on one core, the GIL released), and the
# host-memory tier. On CPU devices a piece is a zero-copy numpy view that keeps the device
# buffer alive, so a step that donates the state writes elsewhere and the snapshot stays
# intact; on accelerators every device-to-host copy is started first and then awaited.
# A checksum belongs to an index range, not to a device, so a checkpoint saved 8-way is
# verified when restored onto 2x4 or one device (by slicing the restored array).
IndexKey = tuple[tuple[int, int], ...]


class _HostLeaf(NamedTuple):
    """One leaf in host memory: index range -> piece, and how to place it back."""

    pieces: dict[IndexKey, np.ndarray]
    sharding: Any  # None: the leaf was not a jax.Array
    shape: tuple[int, ...]


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> IndexKey:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _to_host(leaves: list[Any]) -> list[_HostLeaf]:
    shards = [[(s.index, s.data) for s in x.addressable_shards if s.replica_id == 0]
              if isinstance(x, jax.Array) else [] for x in leaves]
    for data in (data for group in shards for _, data in group):
        if next(iter(data.devices())).platform != "cpu":  # start all transfers, then await
            data.copy_to_host_async()
    out = []
    for x, group in zip(leaves, shards, strict=True):
        if isinstance(x, jax.Array):
            pieces = {_index_key(index, x.shape): np.asarray(data) for index, data in group}
            out.append(_HostLeaf(pieces, x.sharding, x.shape))
        else:
            value = np.array(x, copy=True)
            out.append(_HostLeaf({_index_key((slice(None),) * value.ndim, value.shape): value},
                                 None, value.shape))
    return out


def _from_host(leaf: _HostLeaf) -> Any:
    if leaf.sharding is None:
        return np.array(next(iter(leaf.pieces.values())), copy=True)
    indices = leaf.sharding.addressable_devices_indices_map(leaf.shape)
    # Fresh copies: the snapshot must survive a step that donates the recovered state.
    parts = [jax.device_put(np.array(leaf.pieces[_index_key(index, leaf.shape)], copy=True),
                            device) for device, index in indices.items()]
    return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, parts)


def _checksums(leaf: _HostLeaf) -> list[dict[str, Any]]:
    return [{"index": [list(r) for r in key], "crc32": crc32(piece)}
            for key, piece in sorted(leaf.pieces.items())]


def _verify(where: str, entry: dict[str, Any], leaf: Any) -> None:
    """Check a restored leaf against the saved CRC32 of every saved piece."""
    local: dict[IndexKey, Any] = {}
    if isinstance(leaf, jax.Array):
        local = {_index_key(s.index, leaf.shape): s.data for s in leaf.addressable_shards}
    whole = None
    for piece in entry["pieces"]:
        key = tuple(tuple(r) for r in piece["index"])
        if key in local:  # same layout as saved: no gather
            data = np.asarray(local[key])
        else:
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                continue  # another process holds this range and checks it
            whole = np.asarray(leaf) if whole is None else whole
            data = whole[tuple(slice(a, b) for a, b in key)]
        if crc32(data) != piece["crc32"]:
            raise CheckpointError(
                f"cannot restore {where}: tensor '{entry['path']}' does not match its checksum "
                f"(range {piece['index']}: saved crc32 {piece['crc32']:08x}, read "
                f"{crc32(data):08x}); its data file is corrupt, restore an earlier step")


def _leaf_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Leaf names (Orbax's too: the '.'-joined key path), leaves and tree structure."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return ([jax.tree_util.keystr(p, simple=True, separator=".") for p, _ in flat],
            [x for _, x in flat], treedef)


# --------------------------------------------------------------- manifest item (Orbax handler)
class _ManifestHandler(ocp.JsonCheckpointHandler):
    """A JSON item whose content (the checksums) is computed in the commit thread.

    Orbax commits (renames the step directory) only after every item's commit future has
    finished, so a committed step always has its manifest.
    """

    def __init__(self) -> None:
        super().__init__(filename=MANIFEST_FILE)

    async def async_save(self, directory: epath.Path, item: Any = None,
                         args: Any = None) -> list[Any]:
        build = args.build

        async def write() -> None:
            if jax.process_index() == 0:
                (directory / MANIFEST_FILE).write_text(json.dumps(build(), indent=1))

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="manifest")]


@ocp.args.register_with_handler(_ManifestHandler, for_save=True)
@dataclasses.dataclass
class _ManifestSave(ocp.args.CheckpointArgs):
    build: Callable[[], dict[str, Any]]


# ------------------------------------------------------------------------------ checkpointer
def _close_at_exit(ref: weakref.ref) -> None:
    checkpointer = ref()
    if checkpointer is not None:
        checkpointer.close()


def _register_exit_hook(ref: weakref.ref) -> None:
    """Close the checkpointer when the interpreter exits. Not with `atexit`: threading's exit
    hooks run first and shut down concurrent.futures, which Orbax's commit needs (an async
    save still running at `atexit` time fails with "cannot schedule new futures after
    shutdown"). Threading's hooks run last-registered first, so ours precedes that shutdown.
    """
    register = getattr(threading, "_register_atexit", atexit.register)
    register(functools.partial(_close_at_exit, ref))


def _abstract_leaf(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    if sharding is None:  # no placement given: one device, as a jax.Array (not numpy)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


class TrainCheckpointer:
    """Saves and restores a training state (any pytree of arrays) under one directory.

    The loop's protocol: `restore_latest(abstract_state)` once, `maybe_save(step, state)`
    after every step, `close()` (or a `with` block) at the end. Saves are asynchronous,
    committed atomically (Orbax writes `<step>.orbax-checkpoint-tmp*` and renames it), keep
    the newest `keep` steps, and carry a manifest of CRC32 checksums verified on restore.
    The in-flight save is always awaited: by `close()`, at interpreter exit, and on SIGTERM.
    """

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig | None = None,
                 **overrides: Any) -> None:
        self.config = dataclasses.replace(config or CheckpointConfig(), **overrides)
        self.directory = epath.Path(os.path.abspath(directory))
        # Leftovers of a killed save are never listed as steps; removing them on start keeps
        # the directory from filling up across restarts. (Orbax's own cleanup option runs in
        # the background and is awaited only by the next save.)
        if jax.process_index() == 0 and self.directory.exists():
            for name in ocp.step.tmp_checkpoints(self.directory):
                (self.directory / name).rmtree()
        pytree = ocp.PyTreeCheckpointHandler(use_compression=self.config.compress)
        manifest = _ManifestHandler()
        registry = ocp.DefaultCheckpointHandlerRegistry()
        registry.add(STATE_ITEM, ocp.args.PyTreeSave, pytree)
        registry.add(STATE_ITEM, ocp.args.PyTreeRestore, pytree)
        registry.add(MANIFEST_ITEM, _ManifestSave, manifest)
        registry.add(MANIFEST_ITEM, ocp.args.JsonRestore, manifest)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.config.keep, enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=registry)
        self._memory: tuple[int, Any, list[_HostLeaf]] | None = None
        self._closed = False
        self._in_save = False
        self._pending_sigterm: tuple[int, Any] | None = None
        self._terminating = False
        self.last_save: SaveTiming | None = None
        _register_exit_hook(weakref.ref(self))
        self._previous_sigterm: Any = None
        self._sigterm_installed = False
        if self.config.handle_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._sigterm_installed = True

    # ----------------------------------------------------------------------------- saving
    def maybe_save(self, step: int, state: Any, force: bool = False) -> bool:
        """Snapshot `state` to host memory and/or start a persistent save when `step` is due
        (or `force`). Returns whether a persistent save started. Waits only for the previous
        save to finish (if still running) and for this one to launch."""
        self._check_open()
        self._in_save = True
        try:
            return self._maybe_save(step, state, force)
        finally:
            self._in_save = False
            if self._pending_sigterm is not None:  # arrived mid-launch: handle it now
                self._on_sigterm(*self._pending_sigterm)

    def _maybe_save(self, step: int, state: Any, force: bool) -> bool:
        if self._terminating:  # SIGTERM: only the in-flight save may still commit
            return False
        to_memory = self.config.memory_every and (force or step % self.config.memory_every == 0)
        to_disk = (force or step % self.config.save_every == 0) and \
            step not in self._manager.all_steps()
        if not (to_memory or to_disk):
            return False
        start = time.perf_counter()
        if to_disk:  # back-pressure: one save in flight at a time
            self._manager.wait_until_finished()
        launch = time.perf_counter()
        paths, leaves, treedef = _leaf_paths(state)
        host = _to_host(leaves)
        if to_memory:
            self._memory = (step, treedef, host)
        if not to_disk:
            return False
        dtypes = [str(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)
                  for x in leaves]
        pending = [host]  # dropped once summed, so the commit does not pin the buffers longer

        def build() -> dict[str, Any]:  # runs in Orbax's commit thread
            return {"format": FORMAT, "step": step, "leaves": [
                {"path": p, "shape": list(h.shape), "dtype": d, "pieces": _checksums(h)}
                for p, d, h in zip(paths, dtypes, pending.pop(), strict=True)]}

        self._manager.save(step, force=True, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.PyTreeSave(state), MANIFEST_ITEM: _ManifestSave(build)}))
        self.last_save = SaveTiming(step, launch - start, time.perf_counter() - launch)
        return True

    def wait(self) -> None:
        """Block until the in-flight save (if any) is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the in-flight save and release everything (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._manager.wait_until_finished()
            self._manager.close()
        finally:
            if self._sigterm_installed and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._previous_sigterm)

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # This runs in the main thread between two bytecodes, possibly while it holds a lock
        # (logging's, a file's) that Orbax's commit thread needs, so waiting here can
        # deadlock. Instead: stop launching saves, hand SIGTERM back to the previous handler
        # (a second SIGTERM acts at once), and let a thread re-send the signal once the
        # in-flight save is committed: the process then ends as SIGTERM ends it (-15 / 143),
        # or the previous handler runs. A signal landing mid-launch waits for the launch.
        if self._in_save:
            self._pending_sigterm = (signum, frame)
            return
        self._pending_sigterm = None
        self._terminating = True
        previous = self._previous_sigterm
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        threading.Thread(target=self._terminate_after_save, args=(signum,),
                         name="checkpoint-sigterm", daemon=True).start()

    def _terminate_after_save(self, signum: int) -> None:
        try:
            self._manager.wait_until_finished()
        finally:
            os.kill(os.getpid(), signum)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"the checkpointer of {self.directory} is closed")

    # ---------------------------------------------------------------------------- listing
    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending (an interrupted save is never listed)."""
        if not self.directory.exists():
            return []
        return sorted(ocp.step.checkpoint_steps(self.directory))

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -------------------------------------------------------------------------- restoring
    def restore_latest(self, abstract_state: Any) -> Any | None:
        """The newest committed state laid out like `abstract_state`, or None when there is
        no committed step (a fresh run)."""
        step = self.latest_step()
        return None if step is None else self.restore(step, abstract_state)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Read step `step` into the structure, shapes, dtypes and shardings of
        `abstract_state` (`jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh,
        spec))` or arrays); any mesh works. Raises `CheckpointError` naming the step and the
        tensor or file when the checkpoint is missing, incomplete, corrupt or mismatched."""
        self._check_open()
        self.wait()
        where = f"checkpoint step {step} in {self.directory}"
        if step not in self.all_steps():
            tmp = [p.name for p in self.directory.glob(f"{step}.orbax-checkpoint-tmp*")]
            why = (f"its save was interrupted before the commit (only {tmp[0]} exists)" if tmp
                   else f"it does not exist; committed steps: {self.all_steps()}")
            raise CheckpointError(f"cannot restore {where}: {why}")
        manifest = self._read_manifest(step, where)
        if not (self.directory / str(step) / STATE_ITEM).is_dir():
            raise CheckpointError(f"cannot restore {where}: its array directory "
                                  f"{self.directory / str(step) / STATE_ITEM} is missing")
        target = jax.tree.map(_abstract_leaf, abstract_state)
        paths, targets, _ = _leaf_paths(target)
        _check_tree(where, manifest["leaves"], paths, targets)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.PyTreeRestore(
                    target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}))
        except Exception as err:  # tensorstore/Orbax raise many types; name the tensor
            raise _read_failure(where, self.directory / str(step) / STATE_ITEM, err) from err
        state = restored[STATE_ITEM]
        if self.config.verify:
            for entry, leaf in zip(manifest["leaves"], jax.tree.leaves(state), strict=True):
                _verify(where, entry, leaf)
        return state

    def _read_manifest(self, step: int, where: str) -> dict[str, Any]:
        path = self.directory / str(step) / MANIFEST_ITEM / MANIFEST_FILE
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise CheckpointError(f"cannot restore {where}: its manifest {path} is missing "
                                  f"(checksums unknown)") from err
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot restore {where}: its manifest {path} is unreadable "
                                  f"({err})") from err
        if manifest.get("format") != FORMAT or "leaves" not in manifest:
            raise CheckpointError(f"cannot restore {where}: {path} is not a {FORMAT} manifest")
        return manifest

    # -------------------------------------------------------------------- host-memory tier
    def recover_in_memory(self) -> Snapshot | None:
        """The latest host-memory snapshot (at most `memory_every` steps old) placed back on
        its devices with its shardings, without touching disk; None when there is none."""
        if self._memory is None:
            return None
        step, treedef, leaves = self._memory
        return Snapshot(step, jax.tree.unflatten(treedef, [_from_host(x) for x in leaves]))


def _read_failure(where: str, state_dir: epath.Path, err: BaseException) -> CheckpointError:
    """A `CheckpointError` naming the tensor (Orbax names arrays by their '.'-joined key
    path) and the innermost cause of a failed read."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(c) for c in chain)
    names = (re.findall(r'Error reading "([^"]+?)/[^"/]*"', text)
             + re.findall(r"'path': '([^'/][^']*)/'", text))
    root = chain[-1]
    detail = (str(root).splitlines() or [""])[0][:300]
    what = f"tensor '{names[0]}' could not be read" if names else f"reading {state_dir} failed"
    return CheckpointError(f"cannot restore {where}: {what} ({type(root).__name__}: {detail}); "
                           f"the files under {state_dir} are damaged or missing, restore an "
                           f"earlier step")


def _check_tree(where: str, saved: list[dict[str, Any]], paths: list[str],
                targets: list[jax.ShapeDtypeStruct]) -> None:
    """Refuse a target whose leaves differ from the checkpoint's, naming every difference."""
    saved_by_path = {e["path"]: e for e in saved}
    problems = [f"'{p}' is not in the checkpoint" for p in paths if p not in saved_by_path]
    problems += [f"checkpoint tensor '{p}' is not in the target state"
                 for p in saved_by_path if p not in set(paths)]
    for p, t in zip(paths, targets, strict=True):
        e = saved_by_path.get(p)
        if e is not None and (tuple(e["shape"]), e["dtype"]) != (t.shape, str(t.dtype)):
            problems.append(f"'{p}' is {e['dtype']}{e['shape']} in the checkpoint, "
                            f"{t.dtype}{list(t.shape)} in the target")
    if not problems and [e["path"] for e in saved] != paths:
        problems.append("the leaves are in a different order (a different tree structure)")
    if problems:
        raise CheckpointError(f"cannot restore {where}: the target state does not match: "
                              + "; ".join(problems))
