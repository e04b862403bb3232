"""Human-readable durations and sizes, as the CLI, the preflight and the report print them.

Example:
    >>> human_seconds(42), human_seconds(600), human_seconds(9000)
    ('42 s', '10 min', '2.5 h')
    >>> human_bytes(512), human_bytes(3 * 2**20)
    ('512 B', '3.0 MiB')
"""

from __future__ import annotations


def human_seconds(s: float) -> str:
    """Seconds below 2 minutes, minutes below 2 hours, hours above."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def human_bytes(b: float) -> str:
    """Bytes in B, KiB, MiB or GiB (binary units)."""
    for unit in ("B", "KiB", "MiB"):
        if b < 1024:
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"
