"""The `nexgate` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from . import plugins
from .config import Config, ConfigError, demo_config, find_config, load_config
from .plugins import PluginError



def _load(args: argparse.Namespace) -> Config:
    if getattr(args, "demo", False):
        return demo_config()
    path = find_config(args.config)
    if path is None:
        raise ConfigError("nexgate", ["no config file: pass --config PATH, set NEXGATE_CONFIG, "
                                      "or try `nexgate serve --demo`"])
    return plugins.load_config(path)  # every problem, the plugins' sections' too


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    config = _load(args)
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    workers = args.workers or config.server.workers
    if args.demo:
        from .demo import DemoSeed

        # The demo's store lives in memory: one process, or each worker would have its own.
        return serve(config, host, port, 1, extra_plugins=[DemoSeed(host, port)])
    return serve(config, host, port, workers)


def _cmd_config_check(args: argparse.Namespace) -> int:
    from .app import build_app

    try:
        config = plugins.load_config(args.path)
        build_app(config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except PluginError as exc:
        print(f"{args.path}: plugin problem: {exc}", file=sys.stderr)
        return 1
    print(f"{args.path}: ok ({len(config.providers)} providers, {len(config.models)} models)")
    return 0


def _cmd_plugins_list(args: argparse.Namespace) -> int:
    import json

    path = find_config(args.config)
    config = plugins.load_config(path) if path is not None else Config()
    report = plugins.plugins_report(plugins.build_plugin_manager(config))
    report["config"] = str(path) if path is not None else None
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from .clikit import table

    rows = [{**p, "hooks": ", ".join(h.removeprefix("nexgate_") for h in p["hooks"]),
             "requires_hooks": p["requires_hooks"] or "-"} for p in report["plugins"]]
    print(f"hooks version {report['hooks_version']}; config: {report['config'] or '(none: defaults)'}")
    print(table(rows, [("order", "#"), ("name", "PLUGIN"), ("source", "FROM"), ("origin", "ORIGIN"),
                       ("requires_hooks", "NEEDS"), ("hooks", "HOOKS")]))
    if not report["entrypoints_loaded"]:
        print(f"entry points: skipped (plugins.entrypoints: false or {plugins.ENTRYPOINTS_ENV}=0)")
    print("disabled: " + (", ".join(report["disabled"]) or "(none)"))
    return 0


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _port(text: str) -> int:
    # Without this check 70000 would silently bind port 70000 % 65536.
    port = _int_or_none(text)
    if port is None or not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return port


def _workers(text: str) -> int:
    workers = _int_or_none(text)
    if workers is None or workers < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of worker processes")
    return workers


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexgate", description="NexGate LLM API gateway")
    parser.add_argument("--log-level", default=os.environ.get("NEXGATE_LOG_LEVEL"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default: INFO for serve, WARNING for the other commands")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML config (default: $NEXGATE_CONFIG, ./nexgate.yaml, ./config/nexgate.yaml)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=_port)
    serve.add_argument("--workers", type=_workers, help="worker processes sharing the port (SO_REUSEPORT)")
    serve.add_argument("--demo", action="store_true", help="run offline with the built-in echo provider")
    serve.set_defaults(func=_cmd_serve)

    config = sub.add_parser("config", help="work with config files")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a config file; print every problem")
    check.add_argument("path")
    check.set_defaults(func=_cmd_config_check)

    plugins_parser = sub.add_parser("plugins", help="the plugins this gateway loads")
    plugins_sub = plugins_parser.add_subparsers(dest="plugins_command", required=True)
    listing = plugins_sub.add_parser("list", help="what is loaded, from where, in which order, with which hooks")
    listing.add_argument("--config", help="YAML config (default: $NEXGATE_CONFIG, ./nexgate.yaml, "
                                          "./config/nexgate.yaml; none: the defaults)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=_cmd_plugins_list)

    _plugin_commands(sub, argv)
    return parser


def _config_in(argv: Sequence[str] | None) -> Config:
    """The config a command line names (or the default one), for its plugin list; defaults if none loads.

    A broken config must not break the parser: the command that reads it reports its problems.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    path = None
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    path = find_config(path)
    if path is not None:
        try:
            return load_config(path)
        except ConfigError:
            pass
    return Config()


def _plugin_commands(sub: argparse._SubParsersAction, argv: Sequence[str] | None) -> None:
    """Every plugin's commands (``nexgate_cli_commands``), built-ins and third-party alike."""
    from .plugins import HookChain, build_plugin_manager

    try:
        HookChain(build_plugin_manager(_config_in(argv))).cli_commands(sub)
    except PluginError:
        pass  # a broken plugin must not break the parser: `serve`, `config check`, `plugins list` report it


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .logscrub import install as install_log_scrubber

    install_log_scrubber()
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except PluginError as exc:
        print(f"plugin problem: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
