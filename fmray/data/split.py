"""The held-out split every data source uses: stable and order-free, decided by a hash."""

from __future__ import annotations

import zlib


def in_holdout(key: str, fraction: float) -> bool:
    """Whether the item named by `key` (a document, a conversation, a fact) is held out.

    The same key lands on the same side in every run, whatever the order or the other items.
    """
    return (zlib.crc32(key.encode()) % 10_000) < fraction * 10_000
