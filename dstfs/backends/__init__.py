"""Storage backends: one small interface (`Backend`), implemented by local
files/devices and NBD connections, and wrapped by filters (statistics, error
injection in tests) that pass through what they do not change."""

from dstfs.backends.base import Backend, BackendFilter

__all__ = ["Backend", "BackendFilter"]
