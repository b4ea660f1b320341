"""`sllmd cluster-keys`: print a fresh CurveZMQ key pair as [cluster] TOML lines for config/sllmd.toml.

Every member of a cluster uses the same pair; keep secret_key secret (it authenticates members)."""

from __future__ import annotations

import argparse

from sllmd.cluster.curve import generate_curve_keypair


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="sllmd cluster-keys", description=__doc__).parse_args(argv)
    public, secret = generate_curve_keypair()
    print("[cluster]")
    print(f'secret_key = "{secret.decode()}"')
    print(f'public_key = "{public.decode()}"')
    print(f'public_keys = ["{public.decode()}"]')
    return 0
