"""The `dstfs` command line: build, inspect and tear down arrays, serve nodes.

Rules: every failure is one clear line on stderr and a non-zero exit; a
traceback reaches the user only with --debug. This module is the top of
the CLI: it imports the array commands (`dstfs.commands`), never the other
way round.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys

import trio

from dstfs import __version__, commands
from dstfs.commands import CliError
from dstfs.uri import parse_size

log = logging.getLogger("dstfs")


def setup_logging(verbose: int, debug: bool = False) -> None:
    level = logging.DEBUG if debug or verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from dstfs.malloc import keep_freed_memory
    from dstfs.nbd.protocol import MAX_STRING
    from dstfs.nbd.server import check_unix_path
    from dstfs.serve import (
        ServeConfig,
        bind_errors_unwrapped,
        bound,
        open_export,
        parse_allow,
        parse_listen,
        run_server,
        tls_setup,
    )

    if len(args.export.encode()) > MAX_STRING:
        raise CliError(f"--export NAME is {len(args.export.encode())} bytes: NBD allows 4096")
    listen = None
    if args.unix is None:
        try:
            listen = parse_listen(args.listen)
        except ValueError as e:
            raise CliError(str(e)) from None
    try:
        tls, tls_required = tls_setup(args.tls_cert, args.tls_key, args.tls_ca, args.tls)
        allow = [parse_allow(a) for a in args.allow] if args.allow else None
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        size = parse_size(args.size) if args.size else None
    except ValueError as e:
        raise CliError(f"cannot export {args.path}: {e}") from None
    if args.unix is not None:
        try:
            check_unix_path(args.unix)  # bound() checks again; this says which option
        except OSError as e:
            raise CliError(f"--unix {e.strerror}") from None
    # The address first: one that cannot be bound leaves no file created.
    with contextlib.ExitStack() as stack:
        try:
            socks = stack.enter_context(bound(listen, args.unix))
        except OSError as e:
            raise CliError(f"cannot serve {args.path}: {e}") from None
        try:
            backend = open_export(args.path, size, args.read_only)
        except (ValueError, OSError) as e:
            raise CliError(f"cannot export {args.path}: {e}") from None
        keep_freed_memory()
        cfg = ServeConfig(
            backend=backend,
            export=args.export,
            read_only=args.read_only,
            max_connections=args.max_connections,
            handshake_timeout=args.handshake_timeout,
            tls=tls,
            tls_required=tls_required,
            allow=allow,
        )
        try:
            # An OSError out of a trio run comes in a group of one: one line.
            with bind_errors_unwrapped():
                if args.workers > 1:
                    from dstfs.workers import run_workers

                    return run_workers(cfg, args.workers, socks)
                trio.run(lambda: run_server(cfg, socks))
        except OSError as e:
            raise CliError(f"cannot serve {args.path}: {e}") from None
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"wants a whole number of at least 1, not {text!r}")
    return int(text)


def _workers(text: str) -> int:
    from dstfs.workers import MAX_WORKERS

    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"wants a whole number from 1 to {MAX_WORKERS}, not {text!r}"
        )
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e9:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"wants a number of seconds above 0, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dstfs",
        description="Distributed storage as one FUSE file: NBD and local nodes joined "
        "by an algorithm, changed live through control files.",
    )
    p.add_argument("--version", action="version", version=f"dstfs {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="export a file or block device over NBD")
    s.add_argument("path", help="file or block device to export")
    where = s.add_mutually_exclusive_group()
    where.add_argument(
        "--listen", default="127.0.0.1:10809", metavar="HOST:PORT", help="default 127.0.0.1:10809"
    )
    where.add_argument("--unix", metavar="SOCKET", help="listen on a unix socket instead")
    s.add_argument("--export", default="", metavar="NAME", help="export name (default: empty)")
    s.add_argument("--size", help="create a sparse file of this size if PATH is missing (1G, 512M)")
    s.add_argument("--read-only", action="store_true", help="refuse writes")
    s.add_argument(
        "--max-connections",
        type=_positive_int,
        default=256,
        metavar="N",
        help="clients served at once; more are closed at once (default 256)",
    )
    s.add_argument(
        "--handshake-timeout",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="close a client that has not finished the handshake by then (default 10)",
    )
    s.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="serve from N processes (one core each; the parent only accepts and hands"
        " connections to the least busy); for TLS or many busy clients (default 1)",
    )
    commands.add_access_arguments(s)
    s.set_defaults(func=cmd_serve)

    commands.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.debug)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        sys.stderr.write(f"dstfs {args.command}: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # some other pipe: a real error
        # The reader went (`dstfs status --json | head`): stop quietly, as
        # a tool killed by SIGPIPE would (status 141), and keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _stdout_gone() -> bool:
    """Whether nothing reads stdout any more (the write end of a pipe whose
    reader closed polls as POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False
