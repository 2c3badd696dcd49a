"""``tusk model``: prepare model folders ahead of serving (useful when building images)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tusk.model_source import ModelSourceError, resolve_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tusk model", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    fetch = sub.add_parser(
        "fetch", help="resolve a model (tiny, DIR, hf://org/name or a GGUF file) and print its folder"
    )
    fetch.add_argument("model")
    fetch.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        print(resolve_model(args.model, cache_dir=args.cache_dir).path)
    except ModelSourceError as exc:
        print(f"tusk model: {exc}", file=sys.stderr)
        return 1
    return 0
