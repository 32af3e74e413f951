"""What every store-backed ``nexgate`` command shares: options, the store, output, one-line errors.

Plugins add commands with the ``nexgate_cli_commands`` hook and build them with these helpers:
``add_command(group, name, help, command, common)`` where ``command(env, store)`` is a coroutine
returning an exit code. Errors print one line and exit with 1; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from .config import Config, ConfigError, find_config
from .plugins import load_config, resolve_config
from .store import Conflict, LastOwnerError, NotFound, SchemaError, Store, StoreError, open_store

"""Same lookup as ``nexgate serve`` (nexgate_proxy.cli)."""
CONNECT_TIMEOUT = 10.0


class CliError(Exception):
    """A problem to report on one line, exit code 1."""


@dataclass
class Env:
    args: argparse.Namespace
    config: Config | None
    storage_url: str
    state_url: str

    @property
    def json(self) -> bool:
        return bool(self.args.json)


Command = Callable[[Env, Store], Awaitable[int | None]]


# ----------------------------------------------------------------- plumbing


def environment(args: argparse.Namespace) -> Env:
    config: Config | None = None
    if args.config or not args.storage_url:
        path = find_config(args.config)
        if path is None:
            raise CliError("no config file: pass --config PATH or --storage-url URL, or set NEXGATE_CONFIG")
        # The plugins' sections too: commands read them (auth.bcrypt_rounds, privacy.ip_retention_days).
        config = resolve_config(load_config(path))
    storage_url = args.storage_url or (config.storage_url if config else "")
    state_url = getattr(args, "state_url", None) or (config.state_url if config else "memory://")
    return Env(args, config, storage_url, state_url)


def describe_url(url: str) -> str:
    """The database, for messages: never the URL's password."""
    if url.startswith("sqlite:"):
        return url
    scheme, _, rest = url.partition("://")
    host = rest.rsplit("@", 1)[-1].split("?", 1)[0]
    return f"{scheme}://{host}"


async def _open(env: Env, *, creating: bool = False) -> Store:
    url = env.storage_url
    scheme = url.split(":", 1)[0].lower()
    options: dict[str, Any] = {}
    if scheme == "sqlite":
        from .store.sqlite import MEMORY, parse_sqlite_url

        try:
            path = parse_sqlite_url(url)
        except ValueError as exc:
            raise CliError(f"bad storage URL: {exc}") from None
        if not creating and path != MEMORY and not os.path.exists(path):
            raise CliError(f"the database {path} does not exist: run `nexgate db migrate` to create it")
    elif scheme in ("postgresql", "postgres"):
        options = {"min_size": 1, "max_size": 2, "timeout": CONNECT_TIMEOUT}
    try:
        return await open_store(url, **options)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except StoreError as exc:
        raise CliError(f"cannot open the database {describe_url(url)}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def runner(command: Command, *, creating: bool = False, checked: bool = True) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(_execute(command, args, creating=creating, checked=checked))
        except CliError as exc:
            print(f"nexgate: error: {exc}", file=sys.stderr)
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
        except LastOwnerError as exc:
            print(f"nexgate: error: {exc}", file=sys.stderr)
        except NotFound as exc:
            print(f"nexgate: error: not found: {exc}", file=sys.stderr)
        except Conflict as exc:
            print(f"nexgate: error: conflict: {exc}", file=sys.stderr)
        except SchemaError as exc:
            print(f"nexgate: error: {exc}", file=sys.stderr)
        except StoreError as exc:
            print(f"nexgate: error: the database failed: {first_line(exc)}", file=sys.stderr)
        except KeyboardInterrupt:
            return 130
        except Exception as exc:  # no traceback for the operator; the type says where to look
            print(f"nexgate: error: unexpected {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return 1

    return run


async def _execute(command: Command, args: argparse.Namespace, *, creating: bool, checked: bool) -> int:
    env = environment(args)
    store = await _open(env, creating=creating)
    async with store:
        if checked:
            await store.check_schema()
        return int(await command(env, store) or 0)


def emit(env: Env, data: Any, human: str | Sequence[str]) -> None:
    if env.json:
        print(json.dumps(data, indent=2))
    else:
        print(human if isinstance(human, str) else "\n".join(human))


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    if not rows:
        return "(none)"
    cells = [[title for _, title in columns]]
    cells += [["-" if row.get(key) is None else str(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def add_command(group: Any, name: str, help_text: str, command: Command, common: argparse.ArgumentParser,
         **options: bool) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help_text, description=help_text, parents=[common])
    parser.set_defaults(func=runner(command, **options))
    return parser


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return value


def paging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=non_negative, default=100, help="at most this many (default 100)")
    parser.add_argument("--offset", type=non_negative, default=0, help="skip this many")


def option_parents(state_url_help: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The options every store command takes, and the same plus --state-url (what it is used for)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help="YAML config (default: $NEXGATE_CONFIG, ./nexgate.yaml, ./config/nexgate.yaml)")
    common.add_argument("--storage-url", metavar="URL",
                        help="the database (sqlite:///path.db or postgresql://...) instead of the config's")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    with_state = argparse.ArgumentParser(add_help=False, parents=[common])
    with_state.add_argument("--state-url", metavar="URL", help=f"the state store (redis://...) {state_url_help} "
                                                               "(default: the config's)")
    return common, with_state


