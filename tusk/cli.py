"""The ``tusk`` command: one entry point that hands each subcommand to its component.

Components are imported only when their subcommand runs, so ``tusk router`` works in an image
without torch and ``tusk operator`` without the worker. Nothing imports this module.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help); each module exposes main(argv) -> int
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("tusk.serve", "run router, workers and a KV tier on this machine"),
    "worker": ("tusk.worker.server", "run one inference worker (gRPC)"),
    "router": ("tusk.router.app", "run the OpenAI-compatible router"),
    "epp": ("tusk.router.epp.main", "run the Gateway API endpoint picker (Envoy ext_proc)"),
    "operator": ("tusk.operator.main", "run the Kubernetes operator (kopf)"),
    "sim": ("tusk.router.sim.cli", "simulate a cluster on a request trace with the router's policies"),
    "bench": ("tusk.router.loadgen", "load-test an OpenAI-compatible endpoint"),
    "emulate": ("tusk.emulate", "emulated workers (timing from a profile, no model) for routing tests"),
    "model": ("tusk.model_cli", "prepare models (e.g. build the embedded tiny model)"),
}


def _usage() -> str:
    lines = ["usage: tusk <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `tusk <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from tusk import __version__

        print(f"tusk {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"tusk: unknown command {name!r}; run `tusk --help`", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(
            f"tusk {name}: not available in this installation ({exc}); install the matching extra",
            file=sys.stderr,
        )
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
