"""The h200-llama3-8b profile's numbers, fitted from the measurement file (sim.calibration).

    python benchmarks/fit_profiles.py [--json] [--measurement FILE]

Prints the prefill/extend fit (launch floor, fixed part, per new token, per attention pair), the
decode fit, every timed point with the fit's relative error, and the attention term each other
profile takes from it (scaled by peak bf16 compute). The constants `H200_*` in
src/sglang_dp/sim/cost_model.py are these numbers, rounded to 6 significant digits
(tests/sim/test_calibration.py checks them). FILE defaults to
benchmarks/h200-llama3-8b-measured.json, a copy of the measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sglang_dp.sim.calibration import decode_points, fit_decode, fit_prefill, prefill_points
from sglang_dp.sim.cost_model import PEAK_BF16_TFLOPS, attention_ns_per_pair

MEASUREMENT = Path(__file__).parent / "h200-llama3-8b-measured.json"


def fit(measurement: dict[str, Any]) -> dict[str, Any]:
    """The fitted terms and the per-point errors."""
    prefill, decode = prefill_points(measurement), decode_points(measurement)
    pf, df = fit_prefill(prefill), fit_decode(decode)
    points: list[dict[str, Any]] = [
        {
            "point": f"prefill {p.batch}x({p.cached}+{p.new})",
            "measured_ms": round(p.ms, 3),
            "model_ms": round(pf.ms(p.new_tokens, p.pairs), 3),
        }
        for p in prefill
    ] + [
        {
            "point": f"decode {p.batch}x{p.kv_tokens // p.batch}",
            "measured_ms": round(p.ms, 3),
            "model_ms": round(df.ms(p.batch, p.kv_tokens), 3),
        }
        for p in decode
    ]
    for row in points:
        row["rel_err"] = round(row["model_ms"] / row["measured_ms"] - 1, 4)
    return {
        "prefill": {
            "floor_ms": round(pf.floor_ms, 4),
            "fixed_ms": round(pf.fixed_ms, 5),
            "per_token_ms": round(pf.per_token_ms, 7),
            "tokens_per_s": round(1e3 / pf.per_token_ms),
            "per_pair_ns": round(pf.per_pair_ms * 1e6, 5),
        },
        "decode": {
            "step_ms": round(df.fixed_ms, 5),
            "per_seq_ms": round(df.per_seq_ms, 7),
            "per_kv_token_ns": round(df.per_kv_token_ms * 1e6, 4),
        },
        "attention_ns_per_pair": {
            gpu: round(attention_ns_per_pair(gpu), 4) for gpu in PEAK_BF16_TFLOPS
        },
        "points": points,
        "max_rel_err": max(abs(r["rel_err"]) for r in points),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--measurement", type=Path, default=MEASUREMENT)
    args = parser.parse_args()
    result = fit(json.loads(args.measurement.read_text()))
    if args.json:
        print(json.dumps(result))
        return
    for part in ("prefill", "decode", "attention_ns_per_pair"):
        print(part, json.dumps(result[part]))
    for row in result["points"]:
        print(f"{row['point']:28} {row['measured_ms']:9.3f} ms  model {row['model_ms']:9.3f}  "
              f"{row['rel_err']:+.1%}")  # fmt: skip
    print(f"max relative error {result['max_rel_err']:.1%} over {len(result['points'])} points")


if __name__ == "__main__":
    main()
