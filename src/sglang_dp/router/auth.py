"""The bearer token: the one check both the data path and the admin routes use, and the one
header every client of ours sends (to a worker, a router, a router's admin routes)."""

from __future__ import annotations

import hmac


def bearer_matches(authorization: str | None, key: bytes) -> bool:
    """`authorization` (the header's value, or None) carries `Bearer <key>`; compared in
    constant time, so a wrong key's answer does not time how much of it was right."""
    given = (authorization or "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode("latin-1", "replace"), key)


def bearer_header(key: str | None) -> dict[str, str]:
    """The `authorization` header carrying `key`; none without a key."""
    return {"authorization": f"Bearer {key}"} if key else {}
