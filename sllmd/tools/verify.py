"""`sllmd verify DIR`: re-hash every chunk of an sllmd checkpoint directory (`sllmd.checkpoint.reader.verify`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sllmd.checkpoint.progress import human_bytes
from sllmd.checkpoint.reader import verify
from sllmd.tools.failure import report_failure


def main(argv: list[str]) -> int:
    """Exit 0 when every chunk hashes right, else 1 with one `sllmd: ...` line on stderr."""
    parser = argparse.ArgumentParser(prog="sllmd verify", description="Re-hash every chunk of an sllmd checkpoint.")
    parser.add_argument("dir", type=Path, help="checkpoint directory")
    args = parser.parse_args(argv)
    try:
        report = verify(args.dir)
    except Exception as exc:
        return report_failure(exc)
    print(f"{args.dir}: ok, {report.num_tensors} tensors, {report.num_partitions} partitions, {report.num_chunks} "
          f"chunks, {human_bytes(report.num_bytes)} in {report.seconds:.1f} s")
    return 0
