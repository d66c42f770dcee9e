"""CLI: `python -m localhub serve --root DIR [--host H] [--port N]` and `python -m localhub seed --root DIR`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m localhub",
                                     description="A local Hugging Face Hub-compatible server.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="serve a root directory over HTTP (foreground)")
    p_serve.add_argument("--root", required=True, help="storage directory (created if missing)")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p_seed = sub.add_parser("seed", help="seed users and the demo repos; prints one JSON object")
    p_seed.add_argument("--root", required=True)
    args = parser.parse_args(argv)

    if args.command == "seed":
        from localhub.seed import seed

        print(json.dumps(seed(args.root)))
        return 0
    from localhub.server import serve

    serve(args.root, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
