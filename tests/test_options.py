"""Options declared once (`sglang_dp.options`): what a field carries, which fields become options,
and the config built back from click's values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.options import LOG_LEVELS, build, nested, option, option_fields


@dataclass(frozen=True)
class Inner:
    threshold: float = option(0.5, "A threshold.")
    hidden: int = option(7, "Not on the command line.", cli=False)


@dataclass(frozen=True)
class Outer:
    port: int = option(30000, "Port to listen on.")
    urls: tuple[str, ...] = option((), "URLs.", metavar="URL")
    inner: Inner = nested(Inner)
    derived: str = dataclasses.field(default="plain")  # a field without option(): no flag


def test_an_option_field_carries_its_default_and_how_it_is_shown() -> None:
    port = {f.name: f for f in dataclasses.fields(Outer)}["port"]
    assert port.default == 30000
    assert port.metadata["help"] == "Port to listen on."
    assert port.metadata["cli"] is True
    assert port.metadata["choices"] == () and port.metadata["aliases"] == ()
    assert (port.metadata["type"], port.metadata["metavar"], port.metadata["flag_value"]) == (
        None,
        None,
        None,
    )


def test_choices_and_aliases_are_stored_as_tuples() -> None:
    field = option("info", "Level.", choices=["debug", "info"], aliases=["-l"])
    assert field.metadata["choices"] == ("debug", "info")
    assert field.metadata["aliases"] == ("-l",)


@pytest.mark.parametrize("default", [[], {}, set()])
def test_a_mutable_default_is_refused(default: object) -> None:
    with pytest.raises(TypeError, match="mutable defaults"):
        option(default, "Several values.")


def test_a_nested_field_defaults_to_a_fresh_instance() -> None:
    assert Outer().inner == Inner()
    field = {f.name: f for f in dataclasses.fields(Outer)}["inner"]
    assert field.metadata["nested"] is Inner


def test_option_fields_flatten_nested_ones_and_skip_the_rest() -> None:
    names = [f.name for f in option_fields(Outer)]
    assert names == ["port", "urls", "threshold"]  # not hidden (cli=False), not derived


def test_build_fills_nested_configs_and_ignores_unknown_keys() -> None:
    config = build(Outer, {"port": 1, "threshold": 0.9, "stranger": "ignored"})
    assert config == Outer(port=1, inner=Inner(threshold=0.9))


def test_build_keeps_defaults_for_missing_keys_and_makes_tuples() -> None:
    config = build(Outer, {"urls": ["a", "b"]})
    assert config.urls == ("a", "b") and isinstance(config.urls, tuple)
    assert (config.port, config.inner, config.derived) == (30000, Inner(), "plain")


@given(
    port=st.integers(1, 65535),
    urls=st.lists(st.text(min_size=1), max_size=3),
    threshold=st.floats(0, 1),
)
def test_build_reproduces_every_value_it_is_given(
    port: int, urls: list[str], threshold: float
) -> None:
    config = build(Outer, {"port": port, "urls": urls, "threshold": threshold})
    assert config == Outer(port, tuple(urls), Inner(threshold))


def test_log_levels_are_the_logging_module_names() -> None:
    import logging

    for level in LOG_LEVELS:
        assert isinstance(logging.getLevelName(level.upper()), int)
