"""The threaded engine for servers: `EngineCore` stepped on a background thread.

Requests are validated in the caller's thread (so bad input fails fast), then handed to the
engine thread through a queue; deltas come back through each request's callback, called
from the engine thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Sequence
from typing import Any

from jaxinfer.config import ModelConfig
from jaxinfer.engine.core import EngineConfig, EngineCore, OutputCallback
from jaxinfer.engine.outputs import EngineStats, RequestDelta
from jaxinfer.errors import JaxinferError
from jaxinfer.model.params import Params
from jaxinfer.sampling import SamplingParams
from jaxinfer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Engine:
    """Continuous-batching engine running on its own thread.

    Args:
      params, cfg, tokenizer: the model (see `jaxinfer.load_model`).
      config: engine limits and policies.
      model_name: the name clients use (default: the model file or folder name).
    """

    def __init__(self, params: Params, cfg: ModelConfig, tokenizer: Tokenizer,
                 config: EngineConfig | None = None, model_name: str = "model"):
        self.core = EngineCore(params, cfg, tokenizer, config)
        self.cfg, self.tokenizer, self.config = cfg, tokenizer, self.core.config
        self.model_name = model_name
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stats = self.core.stats()
        self.error: BaseException | None = None

    @classmethod
    def load(cls, model: str | os.PathLike[str] | None = None, *, dtype: str = "float32",
             config: EngineConfig | None = None, progress: bool = True,
             model_name: str | None = None) -> Engine:
        """Load a model (see `jaxinfer.load_model`) into a new, not yet started engine."""
        from jaxinfer.weights.loader import load_model

        loaded = load_model(model, dtype=dtype, progress=progress)
        return cls(loaded.params, loaded.cfg, loaded.tokenizer, config,
                   model_name=model_name or loaded.path.name)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jaxinfer-engine",
                                            daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the thread; unfinished requests end with finish_reason "abort"."""
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def add_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams,
                    on_output: OutputCallback, request_id: str | None = None) -> str:
        """Validate and queue a request (thread-safe); deltas go to `on_output`.

        Raises:
          InputError: the request is invalid (message says why).
          RuntimeError: the engine is not running.
        """
        if self._stop.is_set() or self.error is not None:
            raise RuntimeError("the engine is shutting down or has failed")
        prompt = [int(t) for t in prompt_token_ids]
        self.core.validate(prompt, sampling_params)
        with self._lock:
            request_id = request_id or f"req-{next(self.core._ids)}"
        self._inbox.put(("add", (prompt, sampling_params, request_id, on_output)))
        return request_id

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe); its pages are freed on the engine thread."""
        self._inbox.put(("abort", request_id))

    def stats(self) -> EngineStats:
        """The latest snapshot (taken on the engine thread after each step)."""
        return self._stats

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.core.has_unfinished()
                self._drain(block)
                if self.core.has_unfinished():
                    self.core.step()
                self._stats = self.core.stats()
        except BaseException as e:  # noqa: BLE001 - report any failure to every client
            log.exception("engine thread failed")
            self.error = e
        self._finish_all("abort" if self.error is None else f"engine failure: {self.error}")

    def _drain(self, block: bool) -> None:
        """Apply queued adds/aborts; wait for one when the engine is idle."""
        while True:
            try:
                kind, payload = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                prompt, params, request_id, on_output = payload
                try:
                    self.core.add_request(prompt, params, request_id, on_output)
                except JaxinferError as e:
                    on_output(RequestDelta(request_id=request_id, finished=True,
                                           finish_reason="abort", error=str(e)))
            elif kind == "abort":
                self.core.abort(payload)

    def _finish_all(self, reason: str) -> None:
        for request_id in list(self.core._tracked):
            tracked = self.core._tracked[request_id]
            self.core.abort(request_id)
            if reason != "abort" and tracked.on_output is not None:
                tracked.on_output(RequestDelta(request_id=request_id, finished=True,
                                               finish_reason="abort", error=reason))
        self._stats = self.core.stats()
