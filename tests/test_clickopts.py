"""Click options generated from option fields (`sglang_dp.clickopts`): one flag per field, named
after it, nested fields flattened without a prefix, and click's parsing of each kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click
from click.testing import CliRunner

from sglang_dp.clickopts import click_options
from sglang_dp.options import build, nested, option


@dataclass(frozen=True)
class Balance:
    balance_abs_threshold: int = option(32, "Absolute imbalance.")
    hidden: int = option(3, "Not a flag.", cli=False)


@dataclass(frozen=True)
class Demo:
    port: int = option(30000, "Port to listen on.")
    tp_size: int = option(1, "Tensor-parallel size.", aliases=["--tp"])
    verbose: bool = option(False, "Talk more.")
    metrics: bool = option(True, "Serve /metrics.")
    policy: str = option("fcfs", "Queue order.", choices=("fcfs", "lpm"))
    urls: tuple[str, ...] = option((), "Worker URLs.", metavar="URL")
    limit: float | None = option(None, "A limit. [unset]", type=float)
    ray: str | None = option(None, "Ray address.", type=str, flag_value="local", metavar="ADDR")
    balance: Balance = nested(Balance)


def command(exclude: tuple[str, ...] = ()) -> tuple[click.Command, list[Demo]]:
    got: list[Demo] = []

    @click.command()
    @click_options(Demo, exclude=exclude)
    def run(**values: Any) -> None:
        got.append(build(Demo, values))

    return run, got


def parse(*argv: str) -> Demo:
    run, got = command()
    result = CliRunner().invoke(run, list(argv), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return got[0]


def refused(*argv: str) -> str:
    run, _ = command()
    result = CliRunner().invoke(run, list(argv))
    assert result.exit_code == 2, result.output
    return result.output


def help_text() -> str:
    run, _ = command()
    return CliRunner().invoke(run, ["--help"], terminal_width=200).output


def test_no_arguments_give_the_declared_defaults() -> None:
    assert parse() == Demo()


def test_one_flag_per_field_named_with_dashes_nested_fields_without_a_prefix() -> None:
    run, _ = command()
    flags = {opt for param in run.params for opt in param.opts + param.secondary_opts}
    assert flags == {
        "--port", "--tp-size", "--tp", "--verbose", "--no-verbose", "--metrics", "--no-metrics",
        "--policy", "--urls", "--limit", "--ray", "--balance-abs-threshold",
    }  # fmt: skip
    assert parse("--balance-abs-threshold", "8").balance == Balance(balance_abs_threshold=8)


def test_values_are_converted_to_the_default_type_or_the_declared_one() -> None:
    config = parse("--port", "8000", "--limit", "2.5")
    assert config.port == 8000 and config.limit == 2.5
    assert "'x' is not a valid integer" in refused("--port", "x")


def test_an_alias_sets_the_same_field() -> None:
    assert parse("--tp", "4").tp_size == 4 == parse("--tp-size", "4").tp_size


def test_booleans_take_a_flag_and_its_negation() -> None:
    assert parse("--verbose").verbose is True
    assert parse("--no-metrics").metrics is False
    assert parse("--verbose", "--no-verbose").verbose is False  # the last one wins


def test_choices_are_case_insensitive_and_others_refused_with_the_list() -> None:
    assert parse("--policy", "LPM").policy == "lpm"
    output = refused("--policy", "random")
    assert "'fcfs'" in output and "'lpm'" in output


def test_a_tuple_takes_the_flag_repeated() -> None:
    assert parse("--urls", "http://a", "--urls", "http://b").urls == ("http://a", "http://b")


def test_an_optional_value_flag_alone_takes_its_flag_value() -> None:
    assert parse().ray is None
    assert parse("--ray").ray == "local"
    assert parse("--ray", "10.0.0.1:6379").ray == "10.0.0.1:6379"


def test_excluded_fields_get_no_flag_and_keep_their_default() -> None:
    run, got = command(exclude=("port", "urls"))
    assert CliRunner().invoke(run, ["--port", "1"]).exit_code == 2
    assert CliRunner().invoke(run, []).exit_code == 0
    assert got[0].port == 30000 and got[0].urls == ()


def test_help_shows_the_help_metavars_and_the_set_defaults() -> None:
    text = help_text()
    assert "Port to listen on." in text and "[default: 30000]" in text
    assert "--verbose / --no-verbose" in text
    assert "--urls URL" in text and "--ray ADDR" in text
    assert "[fcfs|lpm]" in text
    limit = next(line for line in text.splitlines() if "--limit" in line)
    assert "default" not in limit  # an unset default is not shown as "None"
