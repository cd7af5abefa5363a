"""GPU discovery and assignment (pure): list syntax, the three sources, dp × tp checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_dp.launcher.gpus import (
    assign_gpus,
    detect_gpus,
    format_gpu_list,
    gpus_from_cuda_visible_devices,
    gpus_from_nvidia_smi_output,
    parse_gpu_list,
)


def no_smi() -> str | None:
    raise AssertionError("nvidia-smi must not run when another source is given")


# --- parse_gpu_list --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("0", (0,)),
        ("0,1,3", (0, 1, 3)),
        ("0-3", (0, 1, 2, 3)),
        ("0-3,6", (0, 1, 2, 3, 6)),
        (" 4 , 2-3 ", (4, 2, 3)),  # order kept: the user's grouping decides the TP groups
        ("5-5", (5,)),
        ("10-11,0", (10, 11, 0)),
    ],
)
def test_parse_gpu_list(text: str, ids: tuple[int, ...]) -> None:
    assert parse_gpu_list(text) == ids


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no GPU ids"),
        ("a", "'a' is not a GPU id"),
        ("0,,1", "'' is not a GPU id"),
        ("-1", "'-1' is not a GPU id"),
        ("1-", "'1-' is not a GPU id"),
        ("3-1", "runs backwards"),
        ("0,1,0", "GPU 0 is listed twice"),
        ("0-3,2", "GPU 2 is listed twice"),
        ("1.5", "not a GPU id"),
        ("0-1-2", "not a GPU id"),
    ],
)
def test_parse_gpu_list_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_gpu_list(text)


@given(st.lists(st.integers(0, 64), unique=True, min_size=1))
def test_parse_gpu_list_round_trips_through_the_short_form(ids: list[int]) -> None:
    assert parse_gpu_list(",".join(map(str, ids))) == tuple(ids)
    assert parse_gpu_list(format_gpu_list(tuple(ids))) == tuple(ids)


def test_format_gpu_list() -> None:
    assert format_gpu_list(()) == "none"
    assert format_gpu_list((0, 1, 2, 3)) == "0-3"
    assert format_gpu_list((0, 1, 2, 3, 6, 8, 9)) == "0-3,6,8-9"
    assert format_gpu_list((3, 1)) == "3,1"


# --- sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ids"),
    [
        ("", ()),
        ("0,1", (0, 1)),
        ("2, 3", (2, 3)),
        ("-1", ()),
        ("1,-1,2", (1,)),  # CUDA stops at the first invalid id
        ("0,", (0,)),
    ],
)
def test_cuda_visible_devices(value: str, ids: tuple[int, ...]) -> None:
    assert gpus_from_cuda_visible_devices(value) == ids


def test_cuda_visible_devices_with_uuids_asks_for_gpus_flag() -> None:
    with pytest.raises(ValueError, match=r"UUIDs are not supported.*--gpus"):
        gpus_from_cuda_visible_devices("GPU-8f6c1a2b-0000-0000-0000-000000000000")
    with pytest.raises(ValueError, match="listed twice"):
        gpus_from_cuda_visible_devices("1,1")


def test_nvidia_smi_output() -> None:
    assert gpus_from_nvidia_smi_output("0\n1\n2\n3\n") == (0, 1, 2, 3)
    assert gpus_from_nvidia_smi_output(" 0 \r\n 1 \r\n") == (0, 1)
    assert gpus_from_nvidia_smi_output("") == ()
    assert gpus_from_nvidia_smi_output("No devices were found\n") == ()


def test_explicit_list_wins() -> None:
    environ = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert detect_gpus("4-5", environ, no_smi) == (4, 5)
    with pytest.raises(ValueError):
        detect_gpus("x", environ, no_smi)


def test_cuda_visible_devices_before_nvidia_smi() -> None:
    assert detect_gpus(None, {"CUDA_VISIBLE_DEVICES": "2,3"}, no_smi) == (2, 3)
    assert detect_gpus(None, {"CUDA_VISIBLE_DEVICES": ""}, no_smi) == ()


def test_nvidia_smi_last() -> None:
    assert detect_gpus(None, {}, lambda: "0\n1\n") == (0, 1)
    assert detect_gpus(None, {}, lambda: None) == ()  # not installed / failed


# --- assignment ------------------------------------------------------------------------------


def test_assign_gpus_consecutive_groups() -> None:
    assert assign_gpus((0, 1, 2, 3), 2, 2) == [(0, 1), (2, 3)]
    assert assign_gpus((0, 1, 2, 3), 4, 1) == [(0,), (1,), (2,), (3,)]
    assert assign_gpus((7, 5, 3, 1), 2, 2) == [(7, 5), (3, 1)]
    assert assign_gpus((0, 1, 2), 1, 2) == [(0, 1)]  # the rest stay unused


def test_assign_gpus_not_enough() -> None:
    with pytest.raises(ValueError, match=r"dp × tp = 16 GPUs needed but only 8 available \(0-7\)"):
        assign_gpus(tuple(range(8)), 8, 2)
    with pytest.raises(ValueError, match=r"but only 0 available \(none\)"):
        assign_gpus((), 1, 1)
    with pytest.raises(ValueError, match="at least 1"):
        assign_gpus((0,), 0, 1)
    with pytest.raises(ValueError, match="at least 1"):
        assign_gpus((0,), 1, 0)


@given(
    st.lists(st.integers(0, 1000), unique=True, max_size=40),
    st.integers(1, 8),
    st.integers(1, 8),
)
def test_assignment_covers_exactly_dp_times_tp_distinct_gpus(
    available: list[int], dp: int, tp: int
) -> None:
    if dp * tp > len(available):
        with pytest.raises(ValueError, match=f"{dp * tp} GPUs needed but only {len(available)}"):
            assign_gpus(tuple(available), dp, tp)
        return
    groups = assign_gpus(tuple(available), dp, tp)
    assert len(groups) == dp
    assert all(len(group) == tp for group in groups)
    flat = [gpu for group in groups for gpu in group]
    assert len(set(flat)) == dp * tp
    assert flat == available[: dp * tp]  # consecutive, in the order given
