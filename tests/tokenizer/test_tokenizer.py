"""jaxinfer.tokenizer against transformers' AutoTokenizer on the SmolLM2 and Gemma 3 GGUFs."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from jaxinfer.errors import CheckpointError, InputError
from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer
from jaxinfer.weights.gguf_io import read_gguf_metadata
from tests.models import REPO, gemma3_path, smollm2_path

slow = pytest.mark.slow

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    spaces  in   between",
    " ",
    "",
    "line1\nline2\n\nline4\n",
    "\n",
    "a\r\nb",
    "\ttabbed\tline\t\t",
    "    indented code\n\tand tab",
    "12345 3.14 1e-9 0.001 -42 1,000,000",
    "Hello, world! What's up? (yes) [no] {maybe} <tag> @#$%^&*",
    "I'm sure they'll've done it, isn't it?",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "café naïve résumé Zürich ÀÉÎÕÜ ñ ß",
    "你好世界",
    "🙂👍🏽",
    "😀😃😄😁😆 family: 👨‍👩‍👧",
    "mixed 中文 and English 🙂 and Ωmega αβγ",
    "سلام नमस्ते こんにちは",
    "\u00a0nbsp and\u200bzero width",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|im_start|>user",
    "<bos>hello<eos>",
    "<start_of_turn>user\nhi<end_of_turn>",
    "x" * 60,
]

CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Bonjour, ça va ? 🙂"},
        {"role": "assistant", "content": "Oui, merci !"},
        {"role": "user", "content": "你好"},
    ],
]


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return smollm2_path()  # fails (never skips) when the test models are missing


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    return gemma3_path()


@pytest.fixture(scope="module")
def smol_meta(smol_path: Path) -> dict[str, Any]:
    return read_gguf_metadata(smol_path)


@pytest.fixture(scope="module")
def gemma_meta(gemma_path: Path) -> dict[str, Any]:
    return read_gguf_metadata(gemma_path)


BUILD_SECONDS: dict[str, float] = {}


def _timed_build(name: str, meta: dict[str, Any]) -> Tokenizer:
    start = time.perf_counter()
    tok = Tokenizer.from_gguf_metadata(meta)
    BUILD_SECONDS[name] = time.perf_counter() - start
    return tok


@pytest.fixture(scope="module")
def smol(smol_meta: dict[str, Any]) -> Tokenizer:
    return _timed_build("smol", smol_meta)


@pytest.fixture(scope="module")
def gemma(gemma_meta: dict[str, Any]) -> Tokenizer:
    return _timed_build("gemma", gemma_meta)


@pytest.fixture(scope="module")
def hf_smol(smol_path: Path) -> Any:
    import transformers
    return transformers.AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)


@pytest.fixture(scope="module")
def hf_gemma(gemma_path: Path) -> Any:
    import transformers
    return transformers.AutoTokenizer.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name)


def _hf_chat_ids(hf: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True,
                                 add_generation_prompt=add_generation_prompt)
    return list(out if isinstance(out, list) else out["input_ids"])


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None,
            skip: bool = True) -> tuple[list[str], str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush(), detok


# ------------------------------------------------------------------------------- module hygiene


def test_module_does_not_import_jax() -> None:
    # Import jaxinfer.tokenizer without running jaxinfer/__init__.py (which pulls in the model).
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('jaxinfer'); pkg.__path__ = [{str(REPO / 'jaxinfer')!r}]\n"
        "sys.modules['jaxinfer'] = pkg\n"
        "import jaxinfer.tokenizer\n"
        "assert 'jax' not in sys.modules, 'jaxinfer.tokenizer imported jax'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------- SmolLM2 (gpt2)


@slow
def test_smol_properties(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert (smol.bos_token_id, smol.eos_token_id) == (1, 2)
    assert (smol.bos_token, smol.eos_token) == ("<|im_start|>", "<|im_end|>")
    # <|im_end|> is eos; <|endoftext|> exists but the template never writes it.
    assert smol.stop_token_ids == frozenset({2})
    assert smol.has_chat_template
    assert smol.token_to_id("<|im_start|>") == 1
    assert smol.token_to_id("no such token") is None
    assert not smol.add_bos_token
    assert smol.encode("<|im_start|>user") == [1, 4093]
    assert BUILD_SECONDS["smol"] < 5


@slow
@pytest.mark.parametrize("model", ["smol", "gemma"])
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(request: Any, model: str, text: str) -> None:
    ours: Tokenizer = request.getfixturevalue(model)
    theirs: Any = request.getfixturevalue(f"hf_{model}")
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(
        text, add_special_tokens=False)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip)


@slow
def test_smol_decode_random_ids_match_transformers(smol: Tokenizer, hf_smol: Any) -> None:
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(smol.vocab_size) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            assert smol.decode(ids, skip) == hf_smol.decode(ids, skip_special_tokens=skip), ids


@slow
@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smol_chat_template_matches_transformers(
        smol: Tokenizer, hf_smol: Any, messages: list[dict[str, str]],
        add_generation_prompt: bool) -> None:
    text = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_smol.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert smol.encode_chat(messages, add_generation_prompt) == _hf_chat_ids(
        hf_smol, messages, add_generation_prompt)


@slow
def test_smol_chat_template_system_message(smol: Tokenizer) -> None:
    default = smol.apply_chat_template([{"role": "user", "content": "hi"}])
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    custom = smol.apply_chat_template(CHATS[1])
    assert custom == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n2+2?"
                      "<|im_end|>\n<|im_start|>assistant\n")
    assert smol.encode_chat(CHATS[1])[:3] == [1, 9690, 198]  # <|im_start|> system \n


@slow
def test_chat_template_rejects_bad_messages(smol: Tokenizer) -> None:
    with pytest.raises(InputError, match="list of dicts"):
        smol.apply_chat_template("hello")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="list of dicts"):
        smol.apply_chat_template(["hello"])  # type: ignore[list-item]


# ------------------------------------------------------------------------------- Gemma 3 (llama)


@slow
def test_gemma_properties(gemma: Tokenizer) -> None:
    assert gemma.vocab_size == 262144
    assert (gemma.bos_token_id, gemma.eos_token_id) == (2, 1)
    assert gemma.add_bos_token
    assert gemma.stop_token_ids == frozenset({1})  # base model: <end_of_turn> is not written
    assert not gemma.has_chat_template
    assert gemma.encode("")[:1] == [2]
    assert gemma.encode("hi", add_special_tokens=False)[:1] != [2]
    assert len(gemma.byte_fallback_ids) == 256
    assert BUILD_SECONDS["gemma"] < 20, BUILD_SECONDS


@slow
def test_gemma_decode_random_ids_match_transformers(gemma: Tokenizer, hf_gemma: Any) -> None:
    rng = random.Random(1)
    byte_ids = sorted(gemma.byte_fallback_ids)
    for _ in range(200):
        ids = [rng.choice(byte_ids) if rng.random() < 0.3 else rng.randrange(gemma.vocab_size)
               for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            assert gemma.decode(ids, skip) == hf_gemma.decode(ids, skip_special_tokens=skip), ids


@slow
def test_base_model_has_no_chat_template(gemma: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InputError, match=r"base model.*plain text prompt"):
        gemma.apply_chat_template(messages)
    with pytest.raises(InputError, match="no chat template"):
        gemma.encode_chat(messages)


# ------------------------------------------------------------------------------- HF folders


@slow
def test_from_hf_dir_matches_transformers(hf_smol: Any, smol: Tokenizer, tmp_path: Path) -> None:
    hf_smol.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 49152)
    assert tok.stop_token_ids == smol.stop_token_ids
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_smol.encode(text) == smol.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == hf_smol.decode(ids)
    for messages in CHATS:
        assert tok.apply_chat_template(messages) == hf_smol.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


@slow
def test_from_hf_dir_config_variants(hf_smol: Any, tmp_path: Path) -> None:
    """BOS from the tokenizer.json post-processor, template in tokenizer_config.json, stop ids
    from generation_config.json; add_bos_token in tokenizer_config.json is ignored (as in
    transformers 5, where tokenizer.json is authoritative)."""
    import transformers
    hf_smol.save_pretrained(tmp_path)
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, chat_template="{{ bos_token }}" + template)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(tmp_path / "tokenizer.json")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert not tok.add_bos_token
    assert tok.encode("Hello world") == hf.encode("Hello world") == [19556, 905]
    assert tok.stop_token_ids == frozenset({2, 0})
    rendered = tok.apply_chat_template(CHATS[1])
    assert rendered == hf.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)

    # A post-processor that adds BOS, as Llama / Gemma tokenizer.json files have.
    tok_json = json.loads((tmp_path / "tokenizer.json").read_text())
    tok_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                            "tokens": ["<|im_start|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok_json))
    tok = Tokenizer.from_hf_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.add_bos_token
    for text in ["Hello world", "<|im_start|>user", ""]:
        assert tok.encode(text) == hf.encode(text)
        assert tok.encode(text)[0] == 1
    # The template writes BOS itself: encode_chat must not add a second one.
    ids = tok.encode_chat(CHATS[1])
    assert ids[:3] == [1, 1, 9690]  # BOS, then the template's <|im_start|>system
    assert ids == tok.encode(rendered, add_special_tokens=False)
    # A template that does not write BOS gets it prepended.
    config["chat_template"] = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.encode_chat(CHATS[1]) == [1] + tok.encode(tok.apply_chat_template(CHATS[1]), False)


@slow
def test_template_features_match_transformers(hf_smol: Any, tmp_path: Path) -> None:
    """tojson without HTML escaping, loop controls, raise_exception, {% generation %}."""
    import transformers
    hf_smol.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}{% if loop.index > 3 %}{% break %}{% endif %}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m | tojson }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = Tokenizer.from_hf_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = CHATS[2] + [{"role": "user", "content": "<b>&'\"</b>"}]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(InputError, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_from_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ------------------------------------------------------------------------------- GGUF variants


def _write_gguf(path: Path, arch: str, tokenizer_kv: dict[str, Any]) -> None:
    """A tokenizer-only GGUF (one dummy tensor) that transformers can open."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(8)
    for key, value in tokenizer_kv.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((1, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@slow
def test_llama2_style_sentencepiece_matches_transformers(gemma_meta: dict[str, Any],
                                                         tmp_path: Path) -> None:
    """A "llama" vocabulary with add_space_prefix (Llama-2 style): Metaspace, strip on decode.

    Built from part of Gemma's vocabulary (normal pieces, bytes, controls; no user-defined
    pieces, which transformers only respells for Gemma architectures).
    """
    import transformers
    tokens, types = gemma_meta["tokenizer.ggml.tokens"], gemma_meta["tokenizer.ggml.token_type"]
    scores = gemma_meta["tokenizer.ggml.scores"]
    normal = [i for i, t in enumerate(types) if t == 1]
    keep = sorted({i for i in range(1000) if types[i] in (3, 6)} | set(normal[:4000])
                  | {i for i in normal if len(tokens[i]) == 1})
    sub = [tokens[i] for i in keep]
    kv = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": sub, "tokenizer.ggml.scores": [float(scores[i]) for i in keep],
        "tokenizer.ggml.token_type": [int(types[i]) for i in keep],
        "tokenizer.ggml.bos_token_id": sub.index("<bos>"),
        "tokenizer.ggml.eos_token_id": sub.index("<eos>"),
        "tokenizer.ggml.unknown_token_id": sub.index("<unk>"),
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": True,
    }
    _write_gguf(tmp_path / "tiny.gguf", "llama", kv)
    tok = Tokenizer.from_gguf_metadata(read_gguf_metadata(tmp_path / "tiny.gguf"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    # Streaming: exact without a prompt; with one, the continuation keeps its leading space.
    gen = tok.encode("The quick brown fox", add_special_tokens=False)
    deltas, rest, _ = _stream(tok, gen)
    assert "".join(deltas) + rest == tok.decode(gen) == "The quick brown fox"
    deltas, rest, _ = _stream(tok, gen, prompt=tok.encode("Say:"))
    assert "".join(deltas) + rest == " The quick brown fox"


@slow
@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_byte_level_split_pre_tokenizer_matches_transformers(
        smol_meta: dict[str, Any], tmp_path: Path, pre: str) -> None:
    """Regex-split pre-tokenizers (transformers maps these names the same way) on SmolLM's
    vocab. For "llama-bpe" jaxinfer also sets ignore_merges like llama.cpp and Llama 3's
    tokenizer.json (transformers does not); no text here reaches a case where that matters."""
    import transformers
    kv = {key: smol_meta[key] for key in (
        "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token")}
    kv["tokenizer.ggml.pre"] = pre
    _write_gguf(tmp_path / "pre.gguf", "llama", kv)
    tok = Tokenizer.from_gguf_metadata(dict(smol_meta, **{"tokenizer.ggml.pre": pre}))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="pre.gguf")
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text), text


@slow
def test_unknown_pre_tokenizer_falls_back_to_gpt2(smol_meta: dict[str, Any], smol: Tokenizer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="jaxinfer.tokenizer"):
        tok = Tokenizer.from_gguf_metadata(dict(smol_meta, **{"tokenizer.ggml.pre": "mystery"}))
    assert "mystery" in caplog.text
    # SmolLM's merges never join digits, so GPT-2 splitting gives the same ids as "smollm".
    for text in TEXTS:
        assert tok.encode(text) == smol.encode(text)


def test_gguf_metadata_errors() -> None:
    with pytest.raises(CheckpointError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})
    with pytest.raises(CheckpointError, match="not supported"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert",
                                      "tokenizer.ggml.tokens": ["a", "b"]})
    with pytest.raises(CheckpointError, match="merges"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
                                      "tokenizer.ggml.tokens": ["a", "b"]})


def test_tiny_byte_level_gguf() -> None:
    """Control tokens stay whole, BOS follows add_bos_token, eot ids join the stop set."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "h", "i", "hi", "Ġ", "Ġhi", "Ċ"]
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3, 3, 3, 1, 1, 1, 1, 1, 1],
        "tokenizer.ggml.merges": ["h i", "Ġ hi"], "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.eot_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}"
                                   "<|im_end|>\n{% endfor %}",
    }
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.encode("hi hi<|im_start|>hi") == [0, 5, 7, 1, 5]
    assert tok.decode([0, 5, 7, 1, 5, 8]) == "hi hihi\n"
    assert tok.decode([0, 5, 2], skip_special_tokens=False) == "<|endoftext|>hi<|im_end|>"
    assert tok.stop_token_ids == frozenset({0, 2})
    assert tok.encode_chat([{"role": "user", "content": "hi"}]) == [0, 1, 5, 2, 8]
    with pytest.raises(InputError):
        tok.decode([-1])


# ------------------------------------------------------------------------------- streaming


@slow
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_stream_random_ids_concatenate_to_decode(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    rng = random.Random(2)
    byte_ids = sorted(tok.byte_fallback_ids)
    for trial in range(150):
        n = rng.randrange(1, 60)
        if byte_ids and trial % 2:  # SentencePiece: many byte tokens, valid runs and invalid
            ids = [rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(tok.vocab_size)
                   for _ in range(n)]
        else:
            ids = [rng.randrange(tok.vocab_size) for _ in range(n)]
        for skip in (True, False):
            deltas, rest, detok = _stream(tok, ids, skip=skip)
            assert "".join(deltas) + rest == tok.decode(ids, skip) == detok.text, ids


@slow
def test_stream_byte_run_that_turns_invalid(gemma: Tokenizer) -> None:
    # "中" as bytes E4 B8 AD is valid alone, but a following stray 0x80 makes ByteFallback
    # turn the whole run into four U+FFFD: nothing may be emitted before the run ends.
    run = [gemma.token_to_id(f"<0x{b:02X}>") for b in (0xE4, 0xB8, 0xAD, 0x80)]
    ids = [*run, gemma.encode("ok", add_special_tokens=False)[0]]
    deltas, rest, _ = _stream(gemma, ids)  # type: ignore[arg-type]
    assert "".join(deltas) + rest == gemma.decode(ids) == "\ufffd" * 4 + "ok"  # type: ignore


@slow
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_stream_real_text(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    prompt = tok.encode("Write something:")
    for text in TEXTS + ["".join(TEXTS)]:
        ids = tok.encode(text, add_special_tokens=False)
        for context in (None, prompt):
            deltas, rest, _ = _stream(tok, ids, prompt=context)
            assert "".join(deltas) + rest == tok.decode(ids), (text, context)
            assert not any("\ufffd" in d for d in deltas), deltas
    # A character comes out as soon as its last byte arrives.
    ids = tok.encode("🙂 👍 x", add_special_tokens=False)
    deltas = [d for d in _stream(tok, ids)[0] if d]
    assert deltas[0] == "🙂"


@slow
def test_stream_with_chat_prompt(smol: Tokenizer) -> None:
    prompt = smol.encode_chat(CHATS[0])
    answer = smol.encode("Sure! 你好 🙂<|im_end|>", add_special_tokens=False)
    deltas, rest, detok = _stream(smol, answer, prompt=prompt)
    assert "".join(deltas) + rest == detok.text == "Sure! 你好 🙂"
    deltas, rest, detok = _stream(smol, answer, prompt=prompt, skip=False)
    assert detok.text == "Sure! 你好 🙂<|im_end|>"
