"""The bearer-token check, the one copy both the data path and the admin routes use."""

from __future__ import annotations

import hmac


def bearer_matches(authorization: str | None, key: bytes) -> bool:
    """`authorization` (the header's value, or None) carries `Bearer <key>`; compared in
    constant time, so a wrong key's answer does not time how much of it was right."""
    given = (authorization or "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode("latin-1", "replace"), key)
