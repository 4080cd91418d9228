"""Fine-tuning methods, one module each, registered by name.

`MethodConfig` is built from the registry: `name` picks the method and each method's
config is a field of the same name (`--method.name lora --method.lora.r 16`).
"""

from __future__ import annotations

from dataclasses import field, make_dataclass

from ..config import ConfigError

# Each import registers its method; the order is the order `tunelab methods` lists them.
from . import lora, qlora, ia3, ptuning, prompt_tuning, prefix, freeze, full  # noqa: F401
from .registry import METHODS, Capabilities, Method, NotMergeable, count_parameters, get, register

def _check_name(self) -> None:
    """`--method.name` is checked when the flags are read: before any model is loaded or any
    run directory created."""
    if self.name not in METHODS:
        raise ConfigError(f"`--method.name` must be one of {', '.join(METHODS)}, got {self.name!r} "
                          f"(`tunelab methods` lists them)")


MethodConfig = make_dataclass(
    "MethodConfig",
    [("name", str, field(default="lora"))]
    + [(name, m.config_cls, field(default_factory=m.config_cls)) for name, m in METHODS.items()],
    namespace={"__post_init__": _check_name},
)
MethodConfig.__module__ = __name__  # so jsonargparse can import it by name
MethodConfig.__doc__ = "Which method trains (`name`) and each method's options."


def selected(cfg) -> tuple[Method, object]:
    """(method, its config) chosen by a MethodConfig."""
    method = get(cfg.name)
    return method, getattr(cfg, cfg.name)


__all__ = ["METHODS", "Capabilities", "Method", "MethodConfig", "NotMergeable", "count_parameters", "get",
           "register", "selected"]
