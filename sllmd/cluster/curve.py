"""CurveZMQ keys of the peer transport: a node's pair and the public keys its peer port admits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import zmq
from zmq.utils import z85

from sllmd.config import ConfigError


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys, z85 (40 characters). `cluster_public_keys` lists every member's public key: the
    ROUTER admits only clients holding one of them, and a DEALER only trusts a server key among them.
    All nodes may share one pair (then the list is that one key) or each may have its own."""

    secret_key: bytes | str
    public_key: bytes | str
    cluster_public_keys: Iterable[bytes | str]

    def __post_init__(self) -> None:
        secret, public = z85_key(self.secret_key), z85_key(self.public_key)
        if zmq.curve_public(secret) != public:
            raise ValueError("CurveKeys: public_key does not belong to secret_key")
        object.__setattr__(self, "secret_key", secret)
        object.__setattr__(self, "public_key", public)
        object.__setattr__(self, "cluster_public_keys", tuple(z85_key(k) for k in self.cluster_public_keys))
        if not self.cluster_public_keys:
            raise ValueError("CurveKeys: cluster_public_keys is empty")


def cluster_curve_keys(secret_key: str, public_key: str, public_keys: Sequence[str]) -> CurveKeys | None:
    """The peer transport's CurveKeys from the [cluster] settings `secret_key`, `public_key` and `public_keys`
    (z85 strings, as `load_config` validated them), or None when none is set (plaintext). Every member shares
    one server pair; `public_keys` lists the client keys the peer port admits (empty: just `public_key`).
    ConfigError (one line) when a key is not 40 z85 characters or the pair does not match."""
    if not (secret_key or public_key or public_keys):
        return None
    try:
        return CurveKeys(secret_key, public_key, tuple(public_keys) or (public_key,))
    except ValueError as exc:
        raise ConfigError(f"cluster keys: {str(exc).removeprefix('CurveKeys: ')}") from None


def generate_curve_keypair() -> tuple[bytes, bytes]:
    """A fresh CurveZMQ pair as (public_z85, secret_z85)."""
    public, secret = zmq.curve_keypair()
    return public, secret


class KeyAllowlist:
    """ZAP credentials provider admitting exactly the listed client public keys (z85). pyzmq's
    CURVE_ALLOW_ANY would admit any key at all, which is no authentication."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._keys


def z85_key(key: bytes | str) -> bytes:
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) != 40:
        raise ValueError("CURVE keys must be 40 z85 characters")
    z85.decode(raw)  # raises ValueError on characters outside z85
    return raw
