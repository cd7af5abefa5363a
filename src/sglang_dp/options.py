"""Options declared once: a dataclass field carries its default and help; click options and the
config object are both generated from it.

    @dataclass(frozen=True)
    class RouterConfig:
        port: int = option(30000, "Port to listen on.")
        engine: EngineConfig = nested(EngineConfig)      # its fields become options too

    @click.command()
    @click_options(RouterConfig)
    def router(**values): run(build(RouterConfig, values))

Flags are the field names with dashes (`balance_abs_threshold` → `--balance-abs-threshold`).
Nested dataclass fields are flattened (their names must be unique across the tree). A field whose
metadata says `cli=False` gets no option; a tuple field takes several values (`nargs=-1`-like
via `multiple`, written `--worker-urls A B` or repeated).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def option(
    default: Any,
    help: str,
    *,
    type: Any = None,
    choices: Sequence[str] = (),
    aliases: Sequence[str] = (),
    cli: bool = True,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that also describes its command-line option."""
    meta = {
        "help": help,
        "type": type,
        "choices": tuple(choices),
        "aliases": tuple(aliases),
        "cli": cli,
        "metavar": metavar,
    }
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple or None for mutable defaults")
    return dataclasses.field(default=default, metadata=meta)


def nested(cls: type[Any]) -> Any:
    """A field holding another options dataclass, whose fields become options too."""
    return dataclasses.field(default_factory=cls, metadata={"nested": cls})


def _fields(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    found: list[dataclasses.Field[Any]] = []
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            found.extend(_fields(f.metadata["nested"]))
        elif f.metadata.get("cli", True) and "help" in f.metadata:
            found.append(f)
    return found


def _click_option(f: dataclasses.Field[Any]) -> Callable[[F], F]:
    import click  # only the CLI needs it; configs are imported by the pure core

    meta = f.metadata
    decls = ["--" + f.name.replace("_", "-"), *meta.get("aliases", ()), f.name]
    help_text = meta["help"]
    if isinstance(f.default, bool):
        flag = "--" + f.name.replace("_", "-")
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default, help=help_text)
    kind: Any
    if meta.get("choices"):
        kind = click.Choice(meta["choices"], case_sensitive=False)
    else:
        kind = meta.get("type") or type(f.default)
    if isinstance(f.default, tuple):
        return click.option(
            *decls,
            type=meta.get("type") or str,
            multiple=True,
            default=f.default,
            help=help_text,
            metavar=meta.get("metavar"),
        )
    return click.option(
        *decls,
        type=kind,
        default=f.default,
        show_default=f.default is not None,
        help=help_text,
        metavar=meta.get("metavar"),
    )


def click_options(cls: type[Any], exclude: Sequence[str] = ()) -> Callable[[F], F]:
    """A decorator adding one click option per field of `cls` (nested ones included)."""

    def decorate(function: F) -> F:
        for f in reversed(_fields(cls)):
            if f.name not in exclude:
                function = _click_option(f)(function)
        return function

    return decorate


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


def flags(config: Any, cls: type[Any] | None = None) -> list[str]:
    """The command-line flags that reproduce `config` (non-default values only)."""
    args: list[str] = []
    for f in dataclasses.fields(cls or type(config)):
        value = getattr(config, f.name)
        if "nested" in f.metadata:
            args += flags(value, f.metadata["nested"])
            continue
        if not f.metadata.get("cli", True) or value == f.default or "help" not in f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, tuple):
            for item in value:
                args += [flag, str(item)]
        elif value is not None:
            args += [flag, str(value)]
    return args
