"""Waiting for a condition with a deadline, as the node-kill benchmark and the tests do.

Example:
    >>> poll_until(lambda: 42, timeout_s=1.0)
    42
    >>> poll_until(lambda: None, timeout_s=0.05, every_s=0.01) is None
    True
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def poll_until(pred: Callable[[], T], timeout_s: float, every_s: float = 0.2) -> T | None:
    """Call `pred()` every `every_s` seconds until it returns something truthy (returned);
    None once `timeout_s` seconds have passed."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every_s)
    return None
