"""The Ollama side of `tunelab export --format ollama`: a Modelfile whose Go TEMPLATE renders
what the run's ChatML-style chat template renders (checked on sample conversations in Python:
the template must be ChatML given its text before the first turn and its default system
prompt), stopping at the end of turn, with the run's system prompt as SYSTEM.
"""

from __future__ import annotations

import re
from typing import Optional

from .config import ConfigError
from .data.template import ChatFormat
from .merge import EXPORT_INFO

def ollama_name(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._") or "tunelab"


def chatml_shape(tokenizer) -> tuple[str, Optional[str]]:
    """(text before the first turn, default system prompt or None) of a ChatML template;
    ConfigError if the template renders anything other than ChatML from those two."""
    marker = [{"role": "user", "content": "Zq7"}]
    text = tokenizer.apply_chat_template(marker, add_generation_prompt=True, tokenize=False)
    start = text.find("<|im_start|>")
    prefix, rest = (text[:start], text[start:]) if start >= 0 else ("", "")
    found = re.fullmatch(r"(?:<\|im_start\|>system\n(.*?)<\|im_end\|>\n)?<\|im_start\|>user\nZq7<\|im_end\|>\n"
                         r"<\|im_start\|>assistant\n", rest, re.S)
    default = found.group(1) if found else None
    samples = [[{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"}],
               [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "U2"}],
               [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]]
    for messages in samples if found else []:
        want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if want != render_chatml(messages, prefix, default):
            found = None
    if not found:
        raise ConfigError("`--format ollama` writes a Go TEMPLATE for ChatML-style chat templates "
                          "(<|im_start|>role ... <|im_end|>); this run's template is another kind. "
                          "Use `--format gguf`: llama.cpp reads the template from the file")
    return prefix, default


def render_chatml(messages: list[dict], prefix: str, default_system: Optional[str]) -> str:
    """What the Modelfile's TEMPLATE renders, written in Python (the generation prompt added):
    the system prompt first (Ollama hands it to the template as .System), then every other turn."""
    text = prefix
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")  # as Ollama collects them
    if system or default_system is not None:
        text += f"<|im_start|>system\n{system or default_system}<|im_end|>\n"
    for m in messages:
        if m["role"] != "system":
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def _literal(text: str) -> str:
    """`text` as literal Go-template text (an opening `{{` written as an action)."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_modelfile(tokenizer, fmt: ChatFormat, system: Optional[str], gguf_name: str) -> str:
    """A Modelfile whose TEMPLATE (Go text/template over Ollama's .System and .Messages, in the
    shape of Ollama's own ChatML templates) renders what the run's chat template renders,
    stopping at its end of turn, with the run's system prompt as SYSTEM."""
    prefix, default = chatml_shape(tokenizer)
    if fmt.end_of_turn_text != "<|im_end|>":
        raise ConfigError(f"the chat template ends a turn with {fmt.end_of_turn_text!r}, not <|im_end|>")
    system_turn = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n"
    system_turn += "{{ end }}" if default is None else f"{{{{ else }}}}<|im_start|>system\n{_literal(default)}<|im_end|>\n{{{{ end }}}}"
    template = (_literal(prefix) + system_turn
                + "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
                + '{{ if ne $m.Role "system" }}<|im_start|>{{ $m.Role }}\n{{ $m.Content }}'
                + '{{ if or (ne $m.Role "assistant") (not $last) }}<|im_end|>\n{{ end }}{{ end }}'
                + '{{ if and $last (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ end }}{{ end }}')
    for text in (template, system or ""):
        if '"""' in text:
            raise ConfigError('the chat template or system prompt contains """, which a Modelfile cannot quote')
    lines = [f"# written by tunelab export; {EXPORT_INFO} beside it has the parity check's figures",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""', f'PARAMETER stop "{fmt.end_of_turn_text}"']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
