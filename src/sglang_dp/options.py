"""Options declared once: a dataclass field carries its default and help; the click options
(`sglang_dp.clickopts`) and the config object are both generated from it.

    @dataclass(frozen=True)
    class RouterConfig:
        port: int = option(30000, "Port to listen on.")
        engine: EngineConfig = nested(EngineConfig)      # its fields become options too

    @click.command()
    @click_options(RouterConfig)                         # sglang_dp.clickopts
    def router(**values): run(build(RouterConfig, values))

Flags are the field names with dashes (`balance_abs_threshold` → `--balance-abs-threshold`).
Nested dataclass fields are flattened (their names must be unique across the tree). A field whose
metadata says `cli=False` gets no option; a tuple field takes several values (the flag repeated:
`--worker-urls A --worker-urls B`). `LOG_LEVELS` are the choices of every `--log-level`.

This module never imports click (not even lazily): the routing core imports it and is compiled
by mypyc, which type-checks everything it imports in a build environment without click.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")  # every --log-level's choices


def option(
    default: Any,
    help: str,
    *,
    type: Any = None,
    choices: Sequence[str] = (),
    aliases: Sequence[str] = (),
    cli: bool = True,
    metavar: str | None = None,
    flag_value: Any = None,
) -> Any:
    """A dataclass field that also describes its command-line option (`flag_value`: the value
    the flag takes when given without one, e.g. `--ray` alone)."""
    meta = {
        "help": help,
        "type": type,
        "choices": tuple(choices),
        "aliases": tuple(aliases),
        "cli": cli,
        "metavar": metavar,
        "flag_value": flag_value,
    }
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple or None for mutable defaults")
    return dataclasses.field(default=default, metadata=meta)


def nested(cls: type[Any]) -> Any:
    """A field holding another options dataclass, whose fields become options too."""
    return dataclasses.field(default_factory=cls, metadata={"nested": cls})


def option_fields(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    """The fields that become options, nested dataclasses flattened."""
    found: list[dataclasses.Field[Any]] = []
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            found.extend(option_fields(f.metadata["nested"]))
        elif f.metadata.get("cli", True) and "help" in f.metadata:
            found.append(f)
    return found


def build(cls: type[T], values: dict[str, Any]) -> T:
    """An instance of `cls` from click's keyword arguments (unknown keys are ignored)."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if "nested" in f.metadata:
            kwargs[f.name] = build(f.metadata["nested"], values)
        elif f.name in values:
            value = values[f.name]
            kwargs[f.name] = tuple(value) if isinstance(f.default, tuple) else value
    return cls(**kwargs)
