"""Shared test helpers, one module per concern (tests import them as
`helpers.NAME`; tests/conftest.py puts tests/ on sys.path):

- `procs`: child processes: real servers (dstfs serve, nbdkit, ...) on free
  loopback ports, always stopped; `run`/`output`/`dstfs`/`sh` wrappers.
- `mounts`: real `dstfs mount`s, loop devices, ext4, always torn down.
- `load`: writer threads, their verification, control-file helpers, waits.
- `netns`: network namespaces for the cut-link tests.
- `patterns`: the offset pattern node images are filled with.
- `aio`: small trio helpers for the in-process tests.
- `certs`: TLS certificates made with openssl (a CA, server and client).
"""
