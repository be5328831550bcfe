"""Command-line commands for real clusters: node start/stop, cluster check, submit, jobs.

(Filled in by the real-cluster work; this module only hooks them into the CLI.)
"""

from __future__ import annotations

import argparse

CLUSTER_COMMANDS: tuple[str, ...] = ()


def add_cluster_commands(sub, common: argparse.ArgumentParser) -> None:
    """Add the cluster subcommands to the ``splitlearn`` parser's subparsers."""


def run_cluster_command(args: argparse.Namespace) -> int:
    raise AssertionError(f"unknown cluster command {args.command}")
