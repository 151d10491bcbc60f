"""Chat templates: read one from a Hugging Face folder and compile it in a Jinja sandbox
with transformers' settings and helpers (raise_exception, tojson, strftime_now)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from jaxinfer.errors import CheckpointError
from jaxinfer.tokenizer.jsonio import _read_json


def _raise_exception(message: str) -> None:
    """`raise_exception()` for chat templates: the template rejects the conversation."""
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """`tojson` for chat templates: plain json.dumps, without Jinja's HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str) -> Any:
    """Compile a checkpoint's chat template in a sandbox, with transformers' Jinja settings."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks
        in some templates): renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(
            f"the checkpoint's chat template does not parse (line {e.lineno}: {e.message}); "
            "fix the template or pass plain prompts") from None


def _hf_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """The chat template of a HF folder: chat_template.jinja, chat_template.json, or
    tokenizer_config.json's "chat_template" (a string, or a list of named templates)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8") or None
    template: Any = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) and template else None
