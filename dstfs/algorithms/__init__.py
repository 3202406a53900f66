"""Algorithms: pure maps from a disk range to node ranges.

Rules: no I/O, no trio. An algorithm is an immutable value built from the
node sizes; changing the array (adding a node) builds a new one. `map()`
returns the extents of a range for reading or for writing: for linear and
stripe they are the same; a mirror (later) reads from one replica and writes
to all of them, which is why the write flag is part of the interface.
"""

from dstfs.algorithms.base import Algorithm, Extent, make_algorithm
from dstfs.algorithms.linear import Linear
from dstfs.algorithms.stripe import DEFAULT_CHUNK, Stripe

ALGORITHMS = {"alg_linear": Linear, "alg_stripe": Stripe}

__all__ = [
    "ALGORITHMS",
    "DEFAULT_CHUNK",
    "Algorithm",
    "Extent",
    "Linear",
    "Stripe",
    "make_algorithm",
]
