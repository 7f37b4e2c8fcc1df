"""The cores this process may use, and TVM's CPU thread pool sized to them."""

from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def use_all_cores() -> None:
    """Size TVM's CPU thread pool to every available core. The pool reads
    TVM_NUM_THREADS once, when the first parallel kernel starts it (unset, it takes
    half the cores on x86), and cannot grow afterwards (`runtime.config_threadpool`
    only narrows it), so the variable is the one knob. A value the user set is kept."""
    os.environ.setdefault("TVM_NUM_THREADS", str(available_cores()))
