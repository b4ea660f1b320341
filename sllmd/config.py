"""Node configuration: loaded once at start, validated, then read-only.

Precedence, lowest first: built-in defaults < the TOML file < `SLLMD_<SECTION>_<KEY>` environment
variables < command-line flags. Unknown sections or keys are errors, so a typo never silently falls
back to a default. `config/sllmd.toml` documents every setting.

A leaf: it imports only the standard library and `sllmd.types`, so every layer may read its sections.
Checks that need another layer's code (the CurveZMQ key pair) run where that layer builds its objects.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sllmd.types import AutoscalingPolicy


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message names it."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8343
    peer_port: int = 8344
    data_dir: str = "/var/lib/sllmd"
    node_id: str = ""  # empty: generated on first start and kept in the data dir
    join: str = ""  # HOST:PEERPORT of a cluster member; empty bootstraps or rejoins
    api_keys: tuple[str, ...] = ()
    log_level: str = "info"
    log_format: str = "json"
    shutdown_timeout_s: float = 10.0
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class DevicesConfig:
    kind: str = "auto"  # auto: every visible CUDA device if any, else CPU devices
    cuda_devices: tuple[int, ...] = ()  # empty: all visible
    cpu_slots: int = 2  # CPU devices
    cpu_slot_memory_gb: float = 4.0  # memory budget of each CPU device
    gpu_memory_reserve_gb: float = 1.0  # left free on each CUDA device (kernels' workspaces, fragmentation)


@dataclass(frozen=True)
class ServingConfig:
    max_queue_per_model: int = 256
    queue_timeout_s: float = 60.0
    max_start_wait_s: float = 600.0  # the longest a request waits through a start that is within its estimate
    torch_threads: int = 0  # 0: torch's default
    max_batch_size: int = 32  # transformers backend: requests that decode together in one forward pass
    max_batch_kv_gb: float = 2.0  # an instance's KV cache at most (the memory it asks for, and its engine's cap)
    pinned_memory_share: float = 0.5  # of each node's device memory, what min_instances' instances may hold
    migration_gap_tokens: int = 20  # catch-up ends once every moved request is at most this far behind
    migration_max_rounds: int = 8  # catch-up rounds before the cut-over happens anyway
    migration_step_timeout_s: float = 10.0  # longest wait for the destination's answer to one step
    max_concurrent_migrations: int = 2  # outgoing migrations at once on this node; more get 409
    resume_on_node_failure: bool = False  # a relayed stream whose serving node died continues elsewhere
    vllm_parked_engines: int = 1  # stopped vLLM engines kept running for the next start of their shape; 0: none
    vllm_prestart: bool = True  # start (and park) a vLLM engine when a deployment's checkpoint reaches this node


@dataclass(frozen=True)
class ClusterConfig:
    advertise_host: str = ""  # host peers and clients use to reach this node; empty: server.host
    tick_s: float = 0.05
    heartbeat_interval_s: float = 0.1
    election_timeout_min_s: float = 0.5
    election_timeout_max_s: float = 1.0
    propose_timeout_s: float = 5.0
    compact_every_entries: int = 1000
    # CurveZMQ on the peer port (z85, 40 characters each); all empty: plaintext. The issue's
    # `cluster_secret_key` / `cluster_public_keys` are `cluster.secret_key` / `cluster.public_keys` here.
    secret_key: str = ""
    public_key: str = ""
    public_keys: tuple[str, ...] = ()  # client keys admitted; empty: just public_key
    dead_node_timeout_s: float = 30.0  # the leader drops instance records of nodes silent this long; 0: never
    checkpoint_copies: int = 2  # nodes whose SSD store fetches a deployment's checkpoint when it is deployed
    peer_link_gbps: float = 1.0  # expected GB/s of a checkpoint copy from a peer until one is measured


@dataclass(frozen=True)
class StoreConfig:
    ssd_budget_gb: float = 100.0  # local SSD checkpoint store under data_dir/store
    dram_budget_gb: float = 8.0  # DRAM cache of checkpoint chunks; 0 disables it
    fetch_connections: int = 4  # parallel Range requests per checkpoint fetch
    fetch_request_mb: int = 64  # bytes per Range request (rounded to whole hash chunks)
    fetch_timeout_s: float = 30.0  # to connect, and between two reads
    fetch_retries: int = 5  # per request, after a connection error or a 5xx
    hub_endpoint: str = ""  # Hugging Face Hub for Hub ids; empty: huggingface_hub's own (HF_ENDPOINT, else the Hub)
    loader_readers: int = 4  # reader threads per checkpoint load
    loader_chunk_mb: int = 16  # bytes per read, and per pinned staging buffer on CUDA nodes
    staging_buffers: int = 16  # pinned staging buffers (CUDA nodes; allocated once at start)
    probe_mb: int = 128  # synthetic checkpoint loaded at start to measure load bandwidths; 0: no probe


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    autoscaling: AutoscalingPolicy = field(default_factory=AutoscalingPolicy)  # deployment defaults

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)


_SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build a validated Config. `overrides` maps "section.key" to a value (from flags); None values
    are ignored so unset flags fall through."""
    raw: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    if path is not None:
        try:
            with open(path, "rb") as f:
                from_file = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        for section, values in from_file.items():
            if not isinstance(values, dict):
                if section in _SECTIONS:
                    raise ConfigError(f"{path}: [{section}] must be a table")
                raise ConfigError(f"{path}: setting '{section}' must be inside a [section]")
            if section not in _SECTIONS:
                raise ConfigError(f"{path}: unknown section [{section}]")
            raw[section].update(values)
    for name, value in (env if env is not None else os.environ).items():
        if not name.startswith("SLLMD_"):
            continue
        section, _, key = name[len("SLLMD_") :].lower().partition("_")
        if section not in _SECTIONS or not key:
            raise ConfigError(f"unknown environment setting {name}")
        raw[section][key] = value
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, _, key = dotted.partition(".")
            raw[section][key] = value
    sections = {name: _build_section(_SECTIONS[name], name, values) for name, values in raw.items()}
    config = Config(**sections)
    _validate(config)
    return config


def _build_section(cls: type, section: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown setting {section}.{key}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Accept the TOML type, or a string from the environment or a flag, for each field type."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item_hint, _) = typing.get_args(hint)
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{name} must be a list")
        return tuple(_coerce(item, item_hint, name) for item in items)
    if isinstance(hint, types.UnionType):
        raise ConfigError(f"{name}: unsupported setting type")  # pragma: no cover - programmer error
    try:
        if hint is bool:
            if isinstance(value, str):
                return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[
                    value.strip().lower()
                ]
            if isinstance(value, bool):
                return value
            raise TypeError
        if hint is int:
            if isinstance(value, bool | float):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError  # nan would pass every range check and inf means nothing here
            return number
        if hint is str:
            if not isinstance(value, str):
                raise TypeError
            return value.strip()
    except (TypeError, ValueError, KeyError):
        raise ConfigError(f"{name} must be a finite {hint.__name__}, got {value!r}" if hint is float
                          else f"{name} must be of type {hint.__name__}, got {value!r}") from None
    raise ConfigError(f"{name}: unsupported setting type")  # pragma: no cover


def _validate(config: Config) -> None:
    s, d, v, a, c = config.server, config.devices, config.serving, config.autoscaling, config.cluster
    checks = [
        (1 <= s.port <= 65535, "server.port must be in 1..65535"),
        (1 <= s.peer_port <= 65535, "server.peer_port must be in 1..65535"),
        (s.port != s.peer_port, "server.port and server.peer_port must differ"),
        (bool(s.data_dir), "server.data_dir must not be empty"),
        (s.log_level in ("debug", "info", "warning", "error"), "server.log_level must be debug|info|warning|error"),
        (s.log_format in ("json", "text"), "server.log_format must be json|text"),
        (s.shutdown_timeout_s >= 0, "server.shutdown_timeout_s must be >= 0"),
        (s.max_body_bytes >= 1024, "server.max_body_bytes must be >= 1024"),
        (not s.join or is_host_port(s.join), "server.join must be HOST:PORT"),
        (d.kind in ("auto", "cpu", "cuda"), "devices.kind must be auto|cpu|cuda"),
        (0 <= d.cpu_slots <= 1024, "devices.cpu_slots must be in 0..1024"),
        (0 < d.cpu_slot_memory_gb <= 1 << 20, "devices.cpu_slot_memory_gb must be in (0, 1048576]"),
        (0 <= d.gpu_memory_reserve_gb <= 1024, "devices.gpu_memory_reserve_gb must be in 0..1024"),
        (v.max_queue_per_model >= 1, "serving.max_queue_per_model must be >= 1"),
        (v.queue_timeout_s > 0, "serving.queue_timeout_s must be > 0"),
        (v.max_start_wait_s >= v.queue_timeout_s, "serving.max_start_wait_s must be >= serving.queue_timeout_s"),
        (v.torch_threads >= 0, "serving.torch_threads must be >= 0"),
        (1 <= v.max_batch_size <= 4096, "serving.max_batch_size must be in 1..4096"),
        (v.max_batch_kv_gb > 0, "serving.max_batch_kv_gb must be > 0"),
        (0 <= v.pinned_memory_share <= 1, "serving.pinned_memory_share must be in 0..1"),
        (v.migration_gap_tokens >= 0, "serving.migration_gap_tokens must be >= 0"),
        (v.migration_max_rounds >= 1, "serving.migration_max_rounds must be >= 1"),
        (v.migration_step_timeout_s > 0, "serving.migration_step_timeout_s must be > 0"),
        (v.max_concurrent_migrations >= 1, "serving.max_concurrent_migrations must be >= 1"),
        (0 <= v.vllm_parked_engines <= 64, "serving.vllm_parked_engines must be in 0..64"),
        (config.store.ssd_budget_gb > 0, "store.ssd_budget_gb must be > 0"),
        (config.store.dram_budget_gb >= 0, "store.dram_budget_gb must be >= 0"),
        (1 <= config.store.fetch_connections <= 64, "store.fetch_connections must be in 1..64"),
        (1 <= config.store.fetch_request_mb <= 4096, "store.fetch_request_mb must be in 1..4096"),
        (config.store.fetch_timeout_s > 0, "store.fetch_timeout_s must be > 0"),
        (0 <= config.store.fetch_retries <= 100, "store.fetch_retries must be in 0..100"),
        (not config.store.hub_endpoint or config.store.hub_endpoint.startswith(("http://", "https://")),
         "store.hub_endpoint must be empty or an http(s):// URL"),
        (1 <= config.store.loader_readers <= 256, "store.loader_readers must be in 1..256"),
        (1 <= config.store.loader_chunk_mb <= 1024, "store.loader_chunk_mb must be in 1..1024"),
        (1 <= config.store.staging_buffers <= 1024, "store.staging_buffers must be in 1..1024"),
        (0 <= config.store.probe_mb <= 65536, "store.probe_mb must be in 0..65536"),
        (1 <= config.cluster.checkpoint_copies <= 64, "cluster.checkpoint_copies must be in 1..64"),
        (0.001 <= config.cluster.peer_link_gbps <= 1000, "cluster.peer_link_gbps must be in 0.001..1000"),
        (0.001 <= c.tick_s <= c.heartbeat_interval_s, "cluster.tick_s must be in 0.001..heartbeat_interval_s"),
        (c.heartbeat_interval_s < c.election_timeout_min_s,
         "cluster.heartbeat_interval_s must be < cluster.election_timeout_min_s"),
        (c.election_timeout_min_s <= c.election_timeout_max_s,
         "cluster.election_timeout_min_s must be <= cluster.election_timeout_max_s"),
        (c.propose_timeout_s > 0, "cluster.propose_timeout_s must be > 0"),
        (c.compact_every_entries >= 1, "cluster.compact_every_entries must be >= 1"),
        (c.dead_node_timeout_s >= 0, "cluster.dead_node_timeout_s must be >= 0"),
    ]
    checks += _cluster_key_checks(c)
    checks += [(False, f"autoscaling.{name} {message}") for name, message in a.problems()]
    for is_ok, message in checks:
        if not is_ok:
            raise ConfigError(message)


def _cluster_key_checks(c: ClusterConfig) -> list[tuple[bool, str]]:
    """What can be checked of the CurveZMQ settings without zmq: all of them empty (plaintext), or both halves
    of the server pair set and `public_keys` (the client keys admitted; empty: just `public_key`) holding
    `public_key`. The keys themselves (40 z85 characters, a matching pair) are checked where the transport's
    keys are built, `sllmd.cluster.curve.cluster_curve_keys`."""
    if not (c.secret_key or c.public_key or c.public_keys):
        return []
    return [
        (bool(c.secret_key and c.public_key), "cluster.secret_key and cluster.public_key must both be set to use "
                                              "CurveZMQ (generate them with `sllmd cluster-keys`)"),
        (not c.public_keys or c.public_key in c.public_keys, "cluster.public_keys must include cluster.public_key"),
    ]


def is_host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 1 <= int(port) <= 65535)
