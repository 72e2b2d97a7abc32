"""How long to wait after failures in a row: the one rule for every retry in the daemon (a child
that will not load or keeps dying, an engine's server that is down, a file deferred for GPU
memory, a webhook receiver that fails, a broker that is unreachable)."""

from __future__ import annotations


def backoff_s(failures: int, *, first_s: float, most_s: float) -> float:
    """The wait after the `failures`-th failure in a row (1 for the first): `first_s`, doubled
    after each further failure, never more than `most_s`."""
    return min(most_s, first_s * 2.0 ** max(0, failures - 1))
