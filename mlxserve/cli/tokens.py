"""``mlxserve token create|ls|rm``: the API tokens a server started with ``--require-auth``
accepts. They live hashed in ``$MLXSERVE_HOME/tokens.json``; a running server sees changes at
once."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mlxserve.auth import TokenStore


def _store(args: argparse.Namespace) -> TokenStore:
    from mlxserve.settings import Settings

    home = Settings().home if args.home is None else args.home.expanduser()
    return TokenStore(home / "tokens.json")


def cmd_create(args: argparse.Namespace) -> int:
    store = _store(args)
    info, token = store.create(args.name or "")
    if args.json:
        print(
            json.dumps(
                {"id": info.id, "name": info.name, "created_at": info.created_at, "token": token}
            )
        )
        return 0
    print(token)
    print(
        f"Token {info.id} created{f' ({info.name})' if info.name else ''}. It is shown only "
        "this once: store it now. Send it as 'Authorization: Bearer <token>'.",
        file=sys.stderr,
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    store = _store(args)
    tokens = store.list()
    if args.json:
        rows = [{"id": t.id, "name": t.name, "created_at": t.created_at} for t in tokens]
        print(json.dumps(rows, indent=2))
        return 0
    if not tokens:
        print("No API tokens. Create one with 'mlxserve token create --name NAME'.")
        return 0
    table = [("ID", "NAME", "CREATED")] + [
        (t.id, t.name, time.strftime("%Y-%m-%d %H:%M", time.localtime(t.created_at)))
        for t in tokens
    ]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        revoked = store.revoke(args.id)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if not revoked:
        print(
            f"No token with id or name '{args.id}' ('mlxserve token ls' lists them).",
            file=sys.stderr,
        )
        return 1
    print(f"Revoked {args.id}; requests using it now get 401.")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``token`` and its verbs on the main parser's subcommands."""
    token = sub.add_parser("token", help="manage API tokens (for --require-auth)")
    verbs = token.add_subparsers(dest="token_command", metavar="VERB", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help)
        p.add_argument(
            "--home",
            type=Path,
            help="state directory holding tokens.json (default: $MLXSERVE_HOME, ~/.mlxserve)",
        )
        return p

    create = verb("create", "create a token and print it (shown once)")
    create.add_argument("--name", help="a label to recognise it by")
    create.add_argument("--json", action="store_true", help="machine-readable output")
    create.set_defaults(func=cmd_create)
    ls = verb("ls", "list tokens (id, name, created; never the secret)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)
    rm = verb("rm", "revoke a token")
    rm.add_argument("id", help="the token's id (or its name)")
    rm.set_defaults(func=cmd_rm)
