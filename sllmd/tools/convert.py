"""`sllmd convert SRC DST [--no-progress] [--dtype D]`: a Hugging Face model directory or a GGUF file into a new
sllmd v1 checkpoint directory (`sllmd.checkpoint.convert.convert`, `sllmd.checkpoint.gguf.convert_gguf`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sllmd.checkpoint.convert import convert
from sllmd.checkpoint.progress import human_bytes
from sllmd.tools.failure import report_failure


def main(argv: list[str]) -> int:
    """Exit 0 with a one-line summary on stdout, 1 with one `sllmd: ...` line on stderr, 130 when interrupted.
    A SRC file ending in .gguf is dequantised to --dtype."""
    parser = argparse.ArgumentParser(prog="sllmd convert", description="Convert a Hugging Face model directory "
                                     "or a GGUF file to the sllmd v1 format.")
    parser.add_argument("src", type=Path, help="Hugging Face model directory (safetensors or pytorch_model.bin), "
                                               "or a .gguf file")
    parser.add_argument("dst", type=Path, help="checkpoint directory to create (must not exist)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="GGUF only: the dtype weights are dequantised to (default float32)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        if args.src.suffix.lower() == ".gguf" and not args.src.is_dir():
            from sllmd.checkpoint.gguf import convert_gguf

            manifest = convert_gguf(args.src, args.dst, dtype=args.dtype, progress=not args.no_progress)
        else:
            manifest = convert(args.src, args.dst, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("sllmd: convert interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return report_failure(exc)
    seconds = time.monotonic() - start
    print(f"{args.dst}: {len(manifest.tensors)} tensors, {len(manifest.aliases)} aliases, "
          f"{len(manifest.partitions)} partitions, {human_bytes(manifest.total_bytes)} in {seconds:.1f} s "
          f"({human_bytes(manifest.total_bytes / max(seconds, 1e-9))}/s)")
    return 0
