"""The live terminal dashboard: pure rendering (`render`), the refresh loop (`live`) and
`sglang-dp top`, which draws it for a router anywhere from its `/debug/stats` (`top`)."""
