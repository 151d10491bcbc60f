"""`jaxinfer serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Host side. This module stays light (argparse only) so the CLI can build its parser without
importing aiohttp or the engine; `run_serve` imports them.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_serve_subparser", "engine_config_overrides", "run_serve"]


def add_serve_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` command to the CLI's subparsers and return its parser."""
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model with continuous batching: POST /v1/completions, "
                    "POST /v1/chat/completions, GET /v1/models, /health and /metrics.")
    p.add_argument("--model", default=None,
                   help="GGUF file, Hugging Face folder, or name under checkpoints/ "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations dtype (default float32)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and see (default: the model's name)")
    engine = p.add_argument_group("engine (defaults: the engine's)")
    engine.add_argument("--max-num-seqs", type=int, default=None,
                        help="most requests decoding together")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget of one engine step")
    engine.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output in tokens (default: the model's context)")
    engine.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="size of the KV page pool in tokens")
    engine.add_argument("--no-prefix-caching", action="store_true",
                        help="do not reuse the KV pages of equal prompt prefixes")
    engine.add_argument("--no-chunked-prefill", action="store_true",
                        help="compute each prompt in one step instead of in chunks")
    p.add_argument("--max-pending", type=int, default=None,
                   help="most requests in the engine (running + waiting); more get HTTP 429 "
                        "(default: 4 x max-num-seqs)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="server log level; INFO logs one line per request (default INFO)")
    return p


def engine_config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `EngineConfig` fields the command line sets (the others keep their defaults)."""
    overrides: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "kv_cache_tokens")
        if getattr(args, name) is not None}
    if args.no_prefix_caching:
        overrides["enable_prefix_caching"] = False
    if args.no_chunked_prefill:
        overrides["enable_chunked_prefill"] = False
    return overrides


def run_serve(args: argparse.Namespace) -> int:
    """Load the model and serve it until interrupted; the exit status.

    Raises:
      JaxinferError: the model or the engine options are invalid (the CLI reports it).
    """
    import logging

    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.errors import InputError
    from jaxinfer.server.launch import serve

    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_pending is not None and args.max_pending < 1:
        raise InputError(f"--max-pending={args.max_pending} must be >= 1")
    engine = Engine.load(args.model, dtype=args.dtype,
                         config=EngineConfig(**engine_config_overrides(args)))
    serve(engine, host=args.host, port=args.port, max_pending=args.max_pending,
          served_model_name=args.served_model_name)
    return 0
