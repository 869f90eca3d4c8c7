"""The command line: `serve` (the default) and the operators' admin commands (`config`, `token ...`)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import config as config_module, configdoc, ledger, server

from .identity import limits, tokens
from .jobs import now_iso


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="whisperd.py", description="Self-hosted WhisperX transcription service.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the HTTP service (the default)")
    commands.add_parser("config", help="print the effective configuration and where each value came from "
                                       "(secrets masked)")
    token = commands.add_parser("token", help="create, list and revoke API tokens (the server need not run)")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="make a token; it is printed once, on the last line")
    create.add_argument("--name", required=True, help="who uses it; their jobs are visible to this token only")
    create.add_argument("--expires-in", type=float, metavar="DAYS", help="refuse it after this many days")
    create.add_argument("--admin", action="store_true", help="may see and cancel every identity's jobs")
    _limit_options(create, allow_default=False)
    create.add_argument("--max-live-sessions", type=_limit_value(int, False), metavar="K",
                        help="live transcription sessions open at once; 0 = no limit "
                             "(default: WHISPER_TOKEN_MAX_LIVE_SESSIONS)")
    update = token_commands.add_parser("update", help="change the limits of the named token in force")
    update.add_argument("name")
    _limit_options(update, allow_default=True)
    token_commands.add_parser("list", help="tokens with name, prefix, dates, limits (never the token itself)")
    revoke = token_commands.add_parser("revoke", help="refuse the named token from now on")
    revoke.add_argument("name")
    args = parser.parse_args(argv)
    if args.command in (None, "serve"):
        return server.main()
    try:
        config = config_module.load()
    except config_module.ConfigError as exc:
        print(f"whisperd: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        configdoc.print_effective(config)
        return 0
    handler = {"create": _create, "update": _update, "list": _list, "revoke": _revoke}[args.token_command]
    try:
        return asyncio.run(_with_ledger(config, handler, args))
    except ledger.LedgerUnavailable as exc:
        print(f"whisperd: {exc}", file=sys.stderr)
        return 1


def _limit_value(kind, allow_default: bool):
    """argparse type for a limit: a number >= 0 (0 = no limit), or 'default' where allowed."""
    def convert(text: str):
        if allow_default and text.strip().lower() == "default":
            return DEFAULT
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if kind is int else ''}number >= 0"
                                              f"{' or default' if allow_default else ''}, got {text!r}") from None
        if value < 0 or value != value:
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
        return value

    return convert


DEFAULT = object()  # `token update --max-queued default`: back to the WHISPER_TOKEN_MAX_* setting


def _limit_options(parser: argparse.ArgumentParser, allow_default: bool) -> None:
    tail = " ('default': the setting's value)" if allow_default else ""
    parser.add_argument("--max-queued", type=_limit_value(int, allow_default), metavar="K",
                        help=f"jobs queued or running at once; 0 = no limit{tail}")
    parser.add_argument("--max-audio-minutes-per-day", type=_limit_value(float, allow_default), metavar="M",
                        help=f"minutes of audio submitted per UTC day; 0 = no limit{tail}")
    parser.add_argument("--max-file-size", type=_limit_value(int, allow_default), metavar="BYTES",
                        help=f"bytes per uploaded file (MAX_FILE_SIZE still applies); 0 = no limit{tail}")
    parser.add_argument("--max-open-uploads", type=_limit_value(int, allow_default), metavar="N",
                        help=f"resumable uploads open at once (created, not yet used or expired); 0 = no limit{tail}")
    parser.add_argument("--max-upload-bytes", type=_limit_value(int, allow_default), metavar="BYTES",
                        help=f"bytes the open resumable uploads may declare together; 0 = no limit{tail}")


def _limits_given(args: argparse.Namespace) -> dict:
    given = {}
    for name in limits.NAMES:
        value = getattr(args, name)
        if value is not None:
            given[name] = None if value is DEFAULT else value
    return given


async def _with_ledger(config, handler, args: argparse.Namespace) -> int:
    """Run one admin command against a migrated ledger; the server need not run."""
    ledger.prepare_schema(config)
    store = ledger.open_ledger(config, "cli")
    await store.open()
    try:
        return await handler(store, args)
    finally:
        await store.close()


async def _create(store: ledger.Ledger, args: argparse.Namespace) -> int:
    if not tokens.NAME_FORMAT.match(args.name):
        print("whisperd: --name must be 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit",
              file=sys.stderr)
        return 2
    if args.expires_in is not None and not args.expires_in > 0:
        print("whisperd: --expires-in must be a number of days > 0", file=sys.stderr)
        return 2
    token, prefix = tokens.new_token()
    algorithm, salt, digest = tokens.hashed_for_storage(token)
    expires_at = tokens.expiry(args.expires_in)
    given = _limits_given(args)
    try:
        await store.insert_token(args.name, prefix, algorithm, salt, digest, args.admin, expires_at,
                                 given)
    except ledger.TokenNameTaken:
        print(f"whisperd: a token named {args.name!r} already exists; revoke it first "
              f"(python whisperd.py token revoke {args.name}) or choose another name", file=sys.stderr)
        return 1
    # live: the token's own maximum of open live sessions (its own table: docs/realtime.md).
    await store.set_live_session_limit(args.name, args.max_live_sessions)
    if args.max_live_sessions is not None:
        given = {**given, "max_live_sessions": args.max_live_sessions}
    shown = "".join(f", {name}={_shown(value)}" for name, value in given.items())
    print(f"Created {'admin ' if args.admin else ''}token {args.name!r} (prefix {prefix}, "
          f"expires {expires_at or 'never'}{shown}). It is shown only this once; send it as "
          "'Authorization: Bearer <token>':")
    print(token)
    return 0


async def _update(store: ledger.Ledger, args: argparse.Namespace) -> int:
    changes = _limits_given(args)
    if not changes:
        print("whisperd: nothing to change: give --max-queued, --max-audio-minutes-per-day, --max-file-size, "
              "--max-open-uploads or --max-upload-bytes",
              file=sys.stderr)
        return 2
    if not await store.update_token_limits(args.name, changes):
        print(f"whisperd: no token in force is named {args.name!r} (see: python whisperd.py token list)",
              file=sys.stderr)
        return 1
    shown = ", ".join(f"{name}={'default' if value is None else _shown(value)}" for name, value in changes.items())
    print(f"updated token {args.name!r}: {shown}")
    return 0


def _shown(value) -> str:
    if value is None:
        return "default"
    return f"{value:g}" if isinstance(value, float) else str(value)


async def _list(store: ledger.Ledger, args: argparse.Namespace) -> int:
    records = await store.list_tokens()
    if not records:
        print("no tokens; create one with: python whisperd.py token create --name NAME")
        return 0
    now = now_iso()
    rows = [("NAME", "PREFIX", "ADMIN", "CREATED", "EXPIRES", "LAST USED", "OPEN UPLOADS", "UPLOAD BYTES",
             "MAX QUEUED", "MAX MIN/DAY", "MAX FILE", "STATE")]
    for r in records:
        state = "revoked " + r.revoked_at if r.revoked_at else ("in force" if r.in_force(now) else "expired")
        rows.append((r.name, r.prefix, "yes" if r.admin else "no", r.created_at, r.expires_at or "never",
                     r.last_used_at or "never", _shown(r.max_open_uploads), _shown(r.max_upload_bytes),
                     _shown(r.max_queued), _shown(r.max_audio_minutes_per_day),
                     _shown(r.max_file_size), state))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


async def _revoke(store: ledger.Ledger, args: argparse.Namespace) -> int:
    if not await store.revoke_token(args.name):
        print(f"whisperd: no token in force is named {args.name!r} (see: python whisperd.py token list)",
              file=sys.stderr)
        return 1
    voices = await store.delete_voices(args.name)  # biometric data goes with its token (docs/security.md)
    print(f"revoked token {args.name!r}: requests with it are refused from now on"
          + (f"; its {voices} enrolled voice(s) deleted" if voices else ""))
    return 0
