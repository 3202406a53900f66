"""dstfs: distributed storage as one FUSE file (after Evgeniy Polyakov's 2007 DST)."""

__version__ = "0.1.0"
