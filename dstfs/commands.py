"""Array commands of the CLI (mount, umount, status, suspend, ...)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    pass
