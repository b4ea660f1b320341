"""The `sllmd` command: runs the daemon, or one of the tool commands.

`sllmd [daemon flags]` runs the daemon; `sllmd COMMAND ...` runs a tool (see --help). Any failure
to start exits non-zero with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help); each module has main(argv) -> int
    "demo-model": ("sllmd.tools.demo_model", "write a tiny Llama-style demo model in Hugging Face layout"),
    "convert": ("sllmd.tools.convert", "convert a Hugging Face model directory to the sllmd v1 format"),
    "verify": ("sllmd.tools.verify", "re-hash every chunk of an sllmd checkpoint directory"),
    "cluster-keys": ("sllmd.tools.cluster_keys", "print a fresh CurveZMQ key pair for [cluster] as TOML lines"),
    "simulate": ("sllmd.sim.simulate", "compare cold-start placement policies on a simulated cluster"),
    "ps": ("sllmd.tools.ps", "list the model instances running in the cluster (--url, --json)"),
    "ls": ("sllmd.tools.ls", "list the deployed models: sizes, cached tiers, pins, instances (--url, --json)"),
}


def daemon_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="sllmd",
        description="Serverless LLM inference daemon. Without a command, runs the daemon.",
        epilog=f"commands (sllmd COMMAND --help):\n{commands}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="TOML config file (see config/sllmd.toml)")
    parser.add_argument("--host", help="HTTP bind address [server.host]")
    parser.add_argument("--port", type=int, help="HTTP port [server.port]")
    parser.add_argument("--peer-port", type=int, help="peer (ZeroMQ) port [server.peer_port]")
    parser.add_argument("--data-dir", help="state and checkpoint directory [server.data_dir]")
    parser.add_argument("--join", metavar="HOST:PORT", help="peer address of a cluster member to join [server.join]")
    parser.add_argument("--node-id", help="this node's id [server.node_id]")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="[server.log_level]")
    parser.add_argument("--log-format", choices=["json", "text"], help="[server.log_format]")
    parser.add_argument(
        "--deploy", action="append", default=[], metavar="NAME=SOURCE",
        help="deploy SOURCE as NAME at start unless NAME is already deployed (repeatable). SOURCE: a Hugging Face "
             "Hub id (org/model[@revision], org/model/file.gguf), a Hugging Face or sllmd directory, a .gguf file, "
             "or an sllmd checkpoint URL",
    )
    return parser


def _parse_deploy(values: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """NAME=SOURCE pairs; a relative path that exists becomes absolute. URLs pass through, and so does text
    shaped like a Hub id (org/model) that names no local path."""
    from sllmd.checkpoint.hub_ref import parse_hub_ref
    from sllmd.types import model_name_problem

    pairs = []
    for value in values:
        name, sep, source = value.partition("=")
        if not sep or not name or not source:
            parser.error(f"--deploy expects NAME=SOURCE, got {value!r}")
        if (problem := model_name_problem(name)) is not None:
            parser.error(f"--deploy {name!r}: the name {problem}")
        try:
            is_hub_id = parse_hub_ref(source) is not None
        except ValueError as exc:
            parser.error(f"--deploy {name}: {exc}")
        if "://" not in source and not (is_hub_id and not Path(source).exists()):
            source = str(Path(source).resolve())
        pairs.append((name, source))
    return pairs


def run_daemon(argv: list[str]) -> int:
    parser = daemon_parser()
    args = parser.parse_args(argv)
    ensure_deployed = _parse_deploy(args.deploy, parser)

    from sllmd.cluster.curve import cluster_curve_keys
    from sllmd.config import ConfigError, load_config

    overrides = {
        "server.host": args.host, "server.port": args.port, "server.peer_port": args.peer_port,
        "server.data_dir": args.data_dir, "server.join": args.join, "server.node_id": args.node_id,
        "server.log_level": args.log_level, "server.log_format": args.log_format,
    }
    try:
        config = load_config(args.config, overrides=overrides)
        # The key pair's check needs zmq, which the leaf config does not import: run it before anything starts.
        cluster_curve_keys(config.cluster.secret_key, config.cluster.public_key, config.cluster.public_keys)
    except ConfigError as exc:
        print(f"sllmd: config error: {exc}", file=sys.stderr)
        return 2

    import uvloop

    from sllmd.daemon import StartupError, serve
    from sllmd.errors import SllmdError
    from sllmd.logs import configure_logging
    from sllmd.worker.devices import DeviceConfigError

    configure_logging(config.server.log_level, config.server.log_format)
    try:
        uvloop.run(serve(config, ensure_deployed))
    except (StartupError, SllmdError, DeviceConfigError) as exc:
        print(f"sllmd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        import importlib

        module_name, _ = COMMANDS[argv[0]]
        command: Callable[[list[str]], int] = importlib.import_module(module_name).main
        return command(argv[1:])
    return run_daemon(argv)


if __name__ == "__main__":
    sys.exit(main())
