"""`jaxinfer serve` over loopback HTTP: the OpenAI shapes, streaming, errors, cancellation,
admission control and metrics, around the real engine on SmolLM2 (loaded once)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxinfer.sampling import SamplingParams
from jaxinfer.server import add_serve_subparser, engine_config_overrides
from jaxinfer.server.app import STATE
from jaxinfer.server.async_engine import AsyncEngine
from tests.server.conftest import MAX_MODEL_LEN, FakeEngine

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0.0}


def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def complete(server: Any, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/v1/completions", json={**GREEDY, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(server: Any, path: str, body: dict[str, Any]) -> list[str]:
    """The `data:` payloads of a streamed response, in order."""
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] for line in response.iter_lines()
                if line.startswith("data: ")]


def wait_until(condition: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# --------------------------------------------------------------------------- happy paths

def test_models_and_health(server: Any, engine: Any) -> None:
    models = client(server).models.list()
    assert [m.id for m in models.data] == [engine.model_name]
    card = httpx.get(f"{server.url}/v1/models/{engine.model_name}").json()
    assert card["max_model_len"] == MAX_MODEL_LEN and card["object"] == "model"
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completion_is_deterministic_and_takes_token_prompts(server: Any, engine: Any) -> None:
    out = client(server).completions.create(
        model=engine.model_name, prompt=PROMPT, max_tokens=10, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion"
    assert out.model == engine.model_name and abs(out.created - time.time()) < 120
    (choice,) = out.choices
    assert choice.text and choice.finish_reason == "length" and choice.index == 0
    ids = engine.tokenizer.encode(PROMPT)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 10)
    assert out.usage.total_tokens == len(ids) + 10
    # The same prompt as token ids, next to another prompt: one choice per prompt.
    both = complete(server, prompt=[ids, "Once upon a time"], max_tokens=10)
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert both["choices"][0]["text"] == choice.text
    alone = complete(server, prompt="Once upon a time", max_tokens=10)
    assert both["choices"][1]["text"] == alone["choices"][0]["text"]
    assert both["usage"]["completion_tokens"] == 20


def test_chat_answers_paris(server: Any) -> None:
    out = client(server).chat.completions.create(
        model=server.app[STATE].model_name, messages=QUESTION, max_tokens=24, temperature=0)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    (choice,) = out.choices
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens > 0 and out.usage.prompt_tokens > 5


def test_streaming_equals_non_streaming(server: Any) -> None:
    body = {**GREEDY, "prompt": PROMPT, "max_tokens": 12}
    whole = complete(server, **body)
    events = stream_events(server, "/v1/completions",
                           {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *text_chunks, usage_chunk = chunks
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == whole["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert all(c["usage"] is None for c in text_chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert len({c["id"] for c in chunks}) == 1

    # Chat through the OpenAI client: the role comes first, then the same content.
    chat = client(server).chat.completions
    answer = chat.create(model=server.app[STATE].model_name, messages=QUESTION,
                         max_tokens=16, temperature=0)
    stream = list(chat.create(model=answer.model, messages=QUESTION, max_tokens=16,
                              temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == (
        answer.choices[0].message.content)
    assert stream[-1].choices[0].finish_reason == answer.choices[0].finish_reason


def test_stop_string_ends_text_before_it(server: Any) -> None:
    text = complete(server, prompt=PROMPT, max_tokens=16)["choices"][0]["text"]
    start = len(text) // 2
    stop = text[start:start + 3]
    cut = text.find(stop)  # the first occurrence is where generation must stop
    assert stop.strip() and cut > 0, text
    out = complete(server, prompt=PROMPT, max_tokens=16, stop=[stop, "never-appears"])
    assert out["choices"][0]["text"] == text[:cut]
    assert out["choices"][0]["finish_reason"] == "stop"
    events = stream_events(server, "/v1/completions",
                           {**GREEDY, "prompt": PROMPT, "max_tokens": 16, "stop": stop,
                            "stream": True})
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == text[:cut]
    assert chunks[-1]["finish_reason"] == "stop"


def test_logprobs(server: Any) -> None:
    out = complete(server, prompt=PROMPT, max_tokens=6, logprobs=3)
    logprobs = out["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 6
    assert "".join(logprobs["tokens"]) == out["choices"][0]["text"]
    assert logprobs["text_offset"][0] == 0
    for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                 logprobs["top_logprobs"], strict=True):
        assert value <= 0 and 3 <= len(top) <= 4 and token in top
        assert all(v <= 0 for v in top.values())
        assert value == pytest.approx(max(top.values()), abs=1e-4)  # greedy: the likeliest

    chat = client(server).chat.completions.create(
        model=out["model"], messages=QUESTION, max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] >= values[1]
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.logprob == pytest.approx(values[0], abs=1e-4)


def test_client_disconnect_aborts_and_frees_pages(server: Any, engine: Any) -> None:
    assert wait_until(lambda: engine.stats().num_running == 0)
    idle_pages = engine.stats().kv_pages_in_use
    body = {**GREEDY, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 3:
                break
        assert engine.stats().num_running == 1
    # Closing the response mid-stream closed the connection.
    assert wait_until(lambda: engine.stats().num_running == 0
                      and engine.stats().kv_pages_in_use == idle_pages), engine.stats()
    assert wait_until(lambda: server.app[STATE].async_engine.num_pending == 0)
    # A client that gives up on a whole (non-streamed) answer aborts it too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=1.0)
    assert wait_until(lambda: engine.stats().num_running == 0
                      and engine.stats().kv_pages_in_use == idle_pages), engine.stats()
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'jaxinfer_requests_total{finish_reason="abort"} 2.0' in metrics


def test_concurrent_streams_match_sequential_results(server: Any) -> None:
    prompts = [f"{name} lives in a house that" for name in
               ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi")]
    sequential = [complete(server, prompt=p, max_tokens=8)["choices"][0]["text"]
                  for p in prompts]

    async def stream_one(http: httpx.AsyncClient, prompt: str) -> str:
        body = {**GREEDY, "prompt": prompt, "max_tokens": 8, "stream": True}
        text = []
        async with http.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(text)

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(stream_one(http, p) for p in prompts))

    assert asyncio.run(all_at_once()) == sequential


def test_too_many_pending_requests_get_429(small_server: Any, engine: Any) -> None:
    url = f"{small_server.url}/v1/completions"
    body = {**GREEDY, "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as first, httpx.Client(timeout=60) as second:
        streams = [http.stream("POST", url, json=body) for http in (first, second)]
        responses = [s.__enter__() for s in streams]
        try:
            # A stream's headers are sent once its request is in the engine.
            assert [r.status_code for r in responses] == [200, 200]
            refused = httpx.post(url, json={**body, "stream": False})
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_error" and "limit of 2" in error["message"]
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    pending = small_server.app[STATE].async_engine
    assert wait_until(lambda: pending.num_pending == 0)
    assert httpx.post(url, json={**GREEDY, "prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_metrics_count_requests(server: Any) -> None:
    def scrape() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        return {sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples}

    before = scrape()
    out = complete(server, prompt=PROMPT, max_tokens=3)
    after = scrape()
    for name in ("requests_running", "requests_waiting", "kv_pages_in_use",
                 "prefix_cache_hit_rate"):
        assert f"jaxinfer_{name}{{}}" in after
    assert after["jaxinfer_kv_pages_total{}"] > 0

    def grew(name: str, labels: str = "{}") -> float:
        return after[name + labels] - before.get(name + labels, 0.0)

    assert grew("jaxinfer_requests_total", '{"finish_reason": "length"}') == 1
    assert grew("jaxinfer_prompt_tokens_total") == out["usage"]["prompt_tokens"]
    assert grew("jaxinfer_generation_tokens_total") == 3
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                      "e2e_request_latency_seconds"):
        assert grew(f"jaxinfer_{histogram}_count") == 1


# --------------------------------------------------------------------------- refusals

LONG_PROMPT = "word " * (MAX_MODEL_LEN + 50)


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", [1, 2], 400, "must be a JSON object"),
    ("/v1/chat/completions", {"max_tokens": 3}, 400, "'messages' is required"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "'messages' must be a non-empty list"),
    ("/v1/completions", {"max_tokens": 3}, 400, "'prompt' is required"),
    ("/v1/completions", {"prompt": 5}, 400, "'prompt' must be a string"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "ten"}, 400, "'max_tokens' must be"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "'stream' must be true or"),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "n": 2}, 400, "'n' must be 1"),
    ("/v1/completions", {"prompt": "a", "echo": True}, 400, "'echo' is not supported"),
    ("/v1/completions", {"prompt": "a", "logprobs": 50}, 400, "at most 20"),
    ("/v1/completions", {"prompt": LONG_PROMPT}, 400, "context"),
    ("/v1/completions", {"prompt": [10**7]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": ["fine", ""]}, 400, "empty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400,
     "context"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "`gpt-4` does not exist"),
    ("/v1/embeddings", {"input": "a"}, 404, "/v1/embeddings"),
])
def test_bad_requests_get_openai_errors(server: Any, path: str, body: Any, status: int,
                                        message: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}{path}", content=content,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_openai_client_sees_errors(server: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client(server).completions.create(model=server.app[STATE].model_name, prompt="a",
                                          temperature=-1)
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client(server).chat.completions.create(model="nope", messages=QUESTION)


# --------------------------------------------------------------------------- fake engine

def test_health_is_503_when_the_engine_thread_died(fake_server: Any) -> None:
    fake, running = fake_server
    assert httpx.get(f"{running.url}/health").status_code == 200
    fake.kill()
    response = httpx.get(f"{running.url}/health")
    assert response.status_code == 503 and response.json()["status"] == "unhealthy"


def test_engine_failure_is_a_500(fake_server: Any) -> None:
    fake, running = fake_server
    fake.fail_next = True
    response = httpx.post(f"{running.url}/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 500
    assert "injected failure" in response.json()["error"]["message"]
    events = stream_events(running, "/v1/chat/completions",
                           {"messages": QUESTION, "stream": True})
    assert "injected failure" in events[-2] and events[-1] == "[DONE]"


def test_shutting_down_refuses_with_503(fake_server: Any) -> None:
    fake, running = fake_server
    running.app[STATE].async_engine.begin_shutdown()
    response = httpx.post(f"{running.url}/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
    assert httpx.get(f"{running.url}/health").status_code == 503


def test_async_engine_generate_and_early_close(fake_server: Any) -> None:
    fake, _ = fake_server
    front = AsyncEngine(fake, max_pending=1)

    async def run() -> tuple[str, list[str]]:
        deltas = [d async for d in front.generate([104, 105], SamplingParams(max_tokens=5))]
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        async with contextlib.aclosing(front.generate([104], SamplingParams(max_tokens=500),
                                                      request_id="early")) as stream:
            async for _ in stream:
                break
        assert front.num_pending == 1  # aborted: its final delta is on its way
        for _ in range(200):
            if front.num_pending == 0:
                break
            await asyncio.sleep(0.01)
        return "".join(d.text for d in deltas), list(fake.aborted)

    text, aborted = asyncio.run(run())
    assert text == FakeEngine.ANSWER[:5] and aborted == ["early"]
    assert front.num_pending == 0


def test_serve_command_line() -> None:
    parser = argparse.ArgumentParser()
    add_serve_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--port", "9000", "--max-num-seqs", "4",
                              "--no-prefix-caching", "--max-pending", "3"])
    assert (args.host, args.port, args.max_pending) == ("127.0.0.1", 9000, 3)
    assert engine_config_overrides(args) == {"max_num_seqs": 4, "enable_prefix_caching": False}
