"""Server fixtures: the real engine on SmolLM2 behind in-process HTTP servers, and a tiny
fake engine (no model) for the failure paths a real one cannot be made to take on demand."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from jaxinfer.engine.outputs import EngineStats, RequestDelta, TokenLogprob
from jaxinfer.errors import InputError
from jaxinfer.sampling import SamplingParams
from jaxinfer.server.app import create_app
from jaxinfer.server.launch import ServerThread
from tests.models import smollm2_path

MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 8
PAGE_SIZE = 16


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """The real continuous-batching engine on SmolLM2-135M-Instruct, small page pool."""
    from jaxinfer.engine.engine import Engine, EngineConfig

    config = EngineConfig(max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=128,
                          max_model_len=MAX_MODEL_LEN, kv_cache_tokens=16 * MAX_MODEL_LEN,
                          page_size=PAGE_SIZE)
    engine = Engine.load(str(smollm2_path()), config=config, progress=False)
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine: Any) -> Iterator[ServerThread]:
    """The app over the real engine, admitting up to 16 requests."""
    with ServerThread(create_app(engine, max_pending=16)) as running:
        yield running


@pytest.fixture(scope="module")
def small_server(engine: Any) -> Iterator[ServerThread]:
    """A second app over the same engine that admits only 2 requests (429 beyond)."""
    with ServerThread(create_app(engine, max_pending=2, served_model_name="small")) as running:
        yield running


# --------------------------------------------------------------------------- fake engine

class CharTokenizer:
    """One token per character (ids are code points below 256); a trivial chat template."""

    vocab_size = 256
    has_chat_template = True

    def encode(self, text: str) -> list[int]:
        if any(ord(c) >= self.vocab_size for c in text):
            raise InputError("only Latin-1 text")
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages)
                           + "assistant:")

    def id_to_token(self, token_id: int) -> str:
        return chr(token_id)


@dataclasses.dataclass
class _FakeRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    on_output: Callable[[RequestDelta], None]
    produced: int = 0
    aborted: bool = False


class FakeEngine:
    """Engine interface without a model: every request spells `ANSWER` one character per
    step. `fail_next` makes the next step fail its requests; `kill()` ends the thread."""

    ANSWER = "Paris is the capital of France. "

    def __init__(self, max_num_seqs: int = 4, step_s: float = 0.005):
        self.tokenizer = CharTokenizer()
        self.cfg = type("Cfg", (), {"max_position_embeddings": 512, "vocab_size": 256})()
        self.config = type("Config", (), {"max_num_seqs": max_num_seqs, "max_model_len": 512})()
        self.model_name = "fake"
        self.fail_next = False
        self.aborted: list[str] = []
        self._step_s = step_s
        self._lock = threading.Lock()
        self._requests: dict[str, _FakeRequest] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def kill(self) -> None:
        self._stop.set()
        self._thread.join()

    def shutdown(self) -> None:
        self.kill()
        with self._lock:
            for r in self._requests.values():
                r.on_output(RequestDelta(r.request_id, finished=True, finish_reason="abort"))
            self._requests.clear()

    def add_request(self, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    on_output: Callable[[RequestDelta], None],
                    request_id: str | None = None) -> str:
        if len(prompt_token_ids) >= self.config.max_model_len:
            raise InputError("prompt longer than the context")
        rid = request_id or f"fake-{time.monotonic_ns()}"
        with self._lock:
            self._requests[rid] = _FakeRequest(rid, list(prompt_token_ids), sampling_params,
                                               on_output)
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._requests:
                self._requests[request_id].aborted = True
                self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        with self._lock:
            running = len(self._requests)
        return EngineStats(num_running=running, num_waiting=0, kv_pages_in_use=running,
                           kv_pages_total=64, prefix_cache_hit_rate=0.0, num_preemptions=0,
                           steps=0, generated_tokens=0, prompt_tokens=0)

    def _loop(self) -> None:
        while not self._stop.wait(self._step_s):
            with self._lock:
                for r in list(self._requests.values()):
                    delta = self._step(r)
                    if delta.finished:
                        del self._requests[r.request_id]
                    r.on_output(delta)

    def _step(self, r: _FakeRequest) -> RequestDelta:
        counts = {"num_prompt_tokens": len(r.prompt), "num_output_tokens": r.produced}
        if r.aborted:
            return RequestDelta(r.request_id, finished=True, finish_reason="abort", **counts)
        if self.fail_next:
            return RequestDelta(r.request_id, finished=True, error="injected failure", **counts)
        token = ord(self.ANSWER[r.produced % len(self.ANSWER)])
        r.produced += 1
        counts["num_output_tokens"] = r.produced
        finished = r.produced >= r.params.max_tokens
        logprobs = None
        if r.params.logprobs is not None:
            logprobs = (TokenLogprob(token, -0.5, ((token, -0.5), (ord("?"), -1.5))),)
        return RequestDelta(r.request_id, chr(token), (token,), logprobs, finished,
                            "length" if finished else None, **counts)


@pytest.fixture
def fake_server() -> Iterator[tuple[FakeEngine, ServerThread]]:
    fake = FakeEngine()
    fake.start()
    with ServerThread(create_app(fake)) as running:
        yield fake, running
    if fake.alive:
        fake.shutdown()
