"""Click options generated from option fields (`sglang_dp.options`): one per field, nested
dataclasses flattened, `--x/--no-x` for booleans, `multiple` for tuples."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from sglang_dp.options import option_fields

F = TypeVar("F", bound=Callable[..., Any])


def _click_option(f: dataclasses.Field[Any]) -> Callable[[F], F]:
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
    if meta.get("flag_value") is not None:  # the value is optional: `--ray` or `--ray ADDRESS`
        return click.option(
            *decls,
            type=kind,
            is_flag=False,
            flag_value=meta["flag_value"],
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
        for f in reversed(option_fields(cls)):
            if f.name not in exclude:
                function = _click_option(f)(function)
        return function

    return decorate
