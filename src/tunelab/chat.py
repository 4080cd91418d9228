"""Terminal chat with a run (adapter on its base) or any model.

Streams tokens, keeps history, renders through the same chat template as training and
stops at the template's end of turn. Commands: /reset, /system TEXT, /quit.
"""

from __future__ import annotations

import sys
from typing import Optional

from .config import GenerationConfig, ModelConfig
from .generate import Engine

HELP = "commands: /reset (forget the history), /system TEXT (set the system prompt), /quit"


def open_engine(run: Optional[str], model: Optional[ModelConfig], no_adapter: bool = False) -> tuple[Engine, dict]:
    """An Engine for a run directory (its adapter unless no_adapter) or for a plain model."""
    if run:
        from .runs import load_run

        net, tokenizer, config = load_run(run, adapter=not no_adapter)
        return Engine(net, tokenizer), config
    if model is None or not model.path:
        raise ValueError("give a run (--run RUN) or a model (--model.path PATH)")
    from .models import load_model, load_tokenizer

    return Engine(load_model(model), load_tokenizer(model)), {}


def chat(run: Optional[str] = None, model: Optional[ModelConfig] = None, no_adapter: bool = False,
         system: Optional[str] = None, gen: GenerationConfig = GenerationConfig(),
         prompt: Optional[str] = None) -> None:
    """Chat in the terminal.

    Args:
        run: a run directory: its base model with its adapter.
        model: any model instead of a run (a directory, .gguf file or hub id).
        no_adapter: with --run, chat with the base model alone.
        system: the system prompt (default: the run's `data.system_prompt`).
        gen: decoding options (greedy by default).
        prompt: answer this one message and exit (no interactive loop).
    """
    engine, config = open_engine(run, model, no_adapter)
    if system is None:
        system = (config.get("data") or {}).get("system_prompt")
    history: list[dict] = []

    def ask(text: str) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": text})
        pieces = []
        for piece in engine.stream(messages, gen):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        answer = "".join(pieces).strip()
        history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": answer}])
        return answer

    if prompt is not None:
        ask(prompt)
        return
    print(f"tunelab chat ({run or model.path}{', no adapter' if no_adapter else ''}). {HELP}")
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history.clear()
            print("(history cleared)")
        elif text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history.clear()
            print(f"(system prompt: {system!r}; history cleared)")
        elif text.startswith("/"):
            print(HELP)
        else:
            ask(text)
