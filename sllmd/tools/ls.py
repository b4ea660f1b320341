"""`sllmd ls`: every deployed model, one row each (`GET /admin/models` and `GET /admin/instances` of any node)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from sllmd.checkpoint.progress import human_bytes
from sllmd.tools.admin_client import NONE, client_parser, get_json, print_rows, run_command

COLUMNS: dict[str, Callable[[dict[str, Any]], str]] = {
    "NAME": lambda row: row["name"],
    "BACKEND": lambda row: row["backend"],
    "SIZE": lambda row: human_bytes(row["checkpoint_bytes"]),
    "MEMORY": lambda row: human_bytes(row["memory_bytes"]),
    "TIERS": lambda row: tiers_text(row["checkpoint_tiers"]),
    "PINS": lambda row: str(row["min_instances"]),
    "INSTANCES": lambda row: str(row["instances"]),
}


def model_rows(models: list[dict[str, Any]], instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The deployed models (not those still deploying) as `sllmd ls` rows (also its --json objects), by name:
    name, backend, checkpoint_bytes, memory_bytes (what one instance asks of a device, on the node asked),
    checkpoint_tiers ({"dram": [node ids], "ssd": [...]}), min_instances, and instances (live, cluster-wide)."""
    counts = collections.Counter(view["model"] for view in instances)
    rows = [{"name": model["name"], "backend": model["backend"], "checkpoint_bytes": model["checkpoint_bytes"],
             "memory_bytes": model["memory"]["total_bytes"], "checkpoint_tiers": model["checkpoint_tiers"],
             "min_instances": model["autoscaling"]["min_instances"], "instances": counts[model["name"]]}
            for model in models if model["status"] == "deployed"]
    return sorted(rows, key=lambda row: row["name"])


def tiers_text(tiers: dict[str, list[str]]) -> str:
    """{"dram": ["n1"], "ssd": ["n1", "n2"]} as "dram:n1 ssd:n1,n2"; tiers holding nothing are left out."""
    return " ".join(f"{tier}:{','.join(nodes)}" for tier, nodes in tiers.items() if nodes) or NONE


def main(argv: list[str]) -> int:
    """Exit 0 after printing the table (or JSON), else 1 with one `sllmd ls: ...` line on stderr."""
    parser = client_parser("sllmd ls", "List the deployed models.")
    args = parser.parse_args(argv)

    def produce() -> None:
        models = get_json(args.url, "/admin/models", args.api_key)["models"]
        instances = get_json(args.url, "/admin/instances", args.api_key)["instances"]
        print_rows(model_rows(models, instances), COLUMNS, args.json)

    return run_command("sllmd ls", produce)
