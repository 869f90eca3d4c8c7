"""The command line: `serve` (the default) and the operators' admin commands."""

from __future__ import annotations

import argparse

from . import server


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="whisperd.py", description="Self-hosted WhisperX transcription service.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the HTTP service (the default)")
    args = parser.parse_args(argv)
    if args.command in (None, "serve"):
        return server.main()
    parser.error(f"unknown command {args.command}")
    return 2
