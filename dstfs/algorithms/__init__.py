"""Algorithms: pure maps from a disk range to node ranges.

Rules: no I/O, no trio. An algorithm is an immutable value built from the
node sizes; changing the array (adding a node) builds a new one. `map()`
returns the extents of a range for reading or for writing: for linear and
stripe they are the same. A `redundant` algorithm (the mirror) returns copies
instead of parts: one extent per replica, each covering the whole range; the
array writes all of them and reads one (see Algorithm.redundant).
"""

from collections.abc import Sequence

from dstfs.algorithms.base import Algorithm, Extent
from dstfs.algorithms.linear import Linear
from dstfs.algorithms.mirror import DEFAULT_REGION, Mirror
from dstfs.algorithms.stripe import DEFAULT_CHUNK, Stripe

ALGORITHMS: dict[str, type] = {"alg_linear": Linear, "alg_stripe": Stripe, "alg_mirror": Mirror}


def make_algorithm(name: str, node_sizes: Sequence[int], **options: int) -> Algorithm:
    """Build the algorithm `name` over nodes of `node_sizes` bytes."""
    try:
        cls = ALGORITHMS[name]
    except KeyError:
        known = ", ".join(sorted(ALGORITHMS))
        raise ValueError(f"unknown algorithm {name!r} (known: {known})") from None
    return cls(node_sizes, **options)


__all__ = [
    "ALGORITHMS",
    "DEFAULT_CHUNK",
    "DEFAULT_REGION",
    "Algorithm",
    "Extent",
    "Linear",
    "Mirror",
    "Stripe",
    "make_algorithm",
]
