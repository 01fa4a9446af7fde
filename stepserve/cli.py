"""`stepserve serve | bench serving | eval mmmu`. Serve flags are generated from `config.ServerArgs`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from stepserve.config import ServerArgs


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        names = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", [])]
        kind = hints[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})".replace("%", "%%")  # argparse formats it
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        parser.add_argument(*names, dest=f.name, type=base, default=f.default, help=help_text)


def parse_server_args(argv: list[str] | None = None, prog: str = "stepserve serve") -> ServerArgs:
    parser = argparse.ArgumentParser(prog=prog, description="Serve a model over an OpenAI-compatible HTTP API.")
    _add_dataclass_flags(parser, ServerArgs)
    return ServerArgs(**vars(parser.parse_args(argv)))


def serve(argv: list[str] | None = None, prog: str = "stepserve serve") -> int:
    from stepserve.api.server import run_server

    run_server(parse_server_args(argv, prog))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: stepserve serve [flags] | stepserve bench serving [flags] | stepserve eval mmmu [flags]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return serve(rest)
    if cmd == "bench" and rest[:1] == ["serving"]:
        from stepserve.bench.serving import main as bench_main

        return bench_main(rest[1:])
    if cmd == "eval" and rest[:1] == ["mmmu"]:
        from stepserve.bench.mmmu import main as mmmu_main

        return mmmu_main(rest[1:])
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
