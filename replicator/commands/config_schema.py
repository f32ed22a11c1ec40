"""`registry-replicator config-schema`: the JSON Schema of the configuration file.

Editors (YAML language server) and CI linters can validate configs with it,
so it is generated from the same models `check` uses and cannot drift.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config-schema",
        help="print the JSON Schema of the configuration file",
        description=(
            "Print the JSON Schema (draft 2020-12) of the YAML configuration file on stdout. "
            "Point your editor's YAML language server at it for completion and validation, "
            "e.g. with a '# yaml-language-server: $schema=replicator.schema.json' comment. "
            "Values the schema cannot express (known site names, cron syntax, duplicate "
            "names) are checked by `registry-replicator check`."
        ),
    )
    parser.add_argument(
        "--indent", type=int, default=2, help="JSON indentation (0 for one line; default 2)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from replicator.config import Config

    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "registry-replicator configuration"
    json.dump(schema, sys.stdout, indent=args.indent or None)
    sys.stdout.write("\n")
    return 0
