"""`sllmd ps`: every instance in the cluster, one row each, from one call to any node (`GET /admin/instances`).

What only an instance's own node knows (idle time, keep-alive left, the tier it loaded from) shows as "-" for
the other nodes' instances; their memory comes from their nodes' statuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sllmd.checkpoint.progress import human_bytes
from sllmd.tools.admin_client import NONE, client_parser, get_json, print_rows, run_command

COLUMNS: dict[str, Callable[[dict[str, Any]], str]] = {
    "MODEL": lambda row: row["model"],
    "NODE": lambda row: row["node"],
    "DEVICE": lambda row: row["device"] or NONE,
    "MEMORY": lambda row: NONE if row["memory_bytes"] is None else human_bytes(row["memory_bytes"]),
    "STATE": lambda row: row["state"] or NONE,
    "IN-FLIGHT": lambda row: NONE if row["in_flight"] is None else str(row["in_flight"]),
    "IDLE": lambda row: human_seconds(row["idle_s"]),
    "UNLOAD-IN": lambda row: human_seconds(row["unload_in_s"]),
    "TIER": lambda row: row["tier"] or NONE,
}


def instance_rows(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The admin API's instance views as `sllmd ps` rows (also its --json objects): id, model, node, device,
    memory_bytes, state, in_flight, idle_s, unload_in_s and tier (where its weights came from); None where
    the answering node does not know."""
    return [{"id": view["id"], "model": view["model"], "node": view["node_id"], "device": view["device"],
             "memory_bytes": view["memory_bytes"], "state": view["state"], "in_flight": view["in_flight"],
             "idle_s": view["idle_s"], "unload_in_s": view["unload_in_s"],
             "tier": view["load"]["source_tier"] if view["load"] else None}
            for view in instances]


def human_seconds(seconds: float | None) -> str:
    """A duration for people, to the second and at most two units: "42s", "3m05s", "2h10m", "4d03h"."""
    if seconds is None:
        return NONE
    total = int(seconds)
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if total >= size:
            return f"{total // size}{unit}{total % size // smaller_size:02d}{smaller}"
    return f"{total}s"


def main(argv: list[str]) -> int:
    """Exit 0 after printing the table (or JSON), else 1 with one `sllmd ps: ...` line on stderr."""
    parser = client_parser("sllmd ps", "List every model instance running in the cluster.")
    args = parser.parse_args(argv)

    def produce() -> None:
        answer = get_json(args.url, "/admin/instances", args.api_key)
        print_rows(instance_rows(answer["instances"]), COLUMNS, args.json)

    return run_command("sllmd ps", produce)
