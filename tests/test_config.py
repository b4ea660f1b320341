"""Node configuration: the shipped TOML documents the defaults exactly, precedence is
defaults < file < environment < flags, and every bad input is a ConfigError naming what is wrong."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

from sllmd.config import Config, ConfigError, _coerce, load_config

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "sllmd.toml"
SECTIONS: dict[str, type] = typing.get_type_hints(Config)
DEFAULTS = load_config(None, env={})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sllmd.toml"
    path.write_text(text)
    return path


def _settings() -> list[tuple[str, str, object]]:
    """(section, key, default) for every setting."""
    return [
        (section, f.name, getattr(getattr(DEFAULTS, section), f.name))
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
    ]


def _env_text(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value)


# -- the shipped file -----------------------------------------------------------------------------


def test_shipped_config_equals_builtin_defaults() -> None:
    assert load_config(SHIPPED, env={}) == DEFAULTS


def test_shipped_config_lists_every_setting_with_its_env_var() -> None:
    text = SHIPPED.read_text()
    document = tomllib.loads(text)
    assert set(document) == set(SECTIONS)
    for section, key, _ in _settings():
        assert key in document[section], f"config/sllmd.toml lacks {section}.{key}"
        env_name = f"SLLMD_{section.upper()}_{key.upper()}"
        assert env_name in text, f"config/sllmd.toml does not mention {env_name}"


def test_every_documented_env_var_round_trips_the_default() -> None:
    env = {f"SLLMD_{s.upper()}_{k.upper()}": _env_text(default) for s, k, default in _settings()}
    assert load_config(None, env=env) == DEFAULTS


# -- environment and flags ------------------------------------------------------------------------


def test_env_overrides_each_type() -> None:
    config = load_config(None, env={
        "SLLMD_SERVER_PORT": " 9000 ",
        "SLLMD_SERVER_PEER_PORT": "9001",
        "SLLMD_SERVING_QUEUE_TIMEOUT_S": "2.5",
        "SLLMD_AUTOSCALING_KEEP_ALIVE_S": "30",
        "SLLMD_SERVER_API_KEYS": "key-a, key-b,,",
        "SLLMD_DEVICES_CUDA_DEVICES": "0,2",
        "SLLMD_SERVER_LOG_FORMAT": "text",
    })
    assert config.server.port == 9000
    assert config.server.peer_port == 9001
    assert config.serving.queue_timeout_s == 2.5
    assert config.autoscaling.keep_alive_s == 30.0
    assert config.server.api_keys == ("key-a", "key-b")
    assert config.devices.cuda_devices == (0, 2)
    assert config.server.log_format == "text"


def test_env_empty_list() -> None:
    assert load_config(None, env={"SLLMD_SERVER_API_KEYS": ""}).server.api_keys == ()


def test_env_without_sllmd_prefix_is_ignored() -> None:
    assert load_config(None, env={"PATH": "/bin", "SLLMDPORT": "1", "sllmd_server_port": "1"}) == DEFAULTS


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("Yes", True), (" TRUE ", True), ("0", False), ("false", False), ("no", False)],
)
def test_bool_from_text(text: str, expected: bool) -> None:
    assert _coerce(text, bool, "section.flag") is expected


@pytest.mark.parametrize("value", ["maybe", "", 1, 0.0])
def test_bool_rejects_other_values(value: object) -> None:
    with pytest.raises(ConfigError, match=r"section\.flag must be of type bool"):
        _coerce(value, bool, "section.flag")


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server]\nport = 9001\nhost = '0.0.0.0'\n[serving]\nqueue_timeout_s = 5.0\n")
    env = {"SLLMD_SERVER_PORT": "9002", "SLLMD_SERVING_QUEUE_TIMEOUT_S": "6"}

    from_file = load_config(path, env={})
    assert (from_file.server.port, from_file.server.host, from_file.serving.queue_timeout_s) == (9001, "0.0.0.0", 5.0)
    assert from_file.server.peer_port == DEFAULTS.server.peer_port

    from_env = load_config(path, env=env)
    assert (from_env.server.port, from_env.serving.queue_timeout_s) == (9002, 6.0)
    assert from_env.server.host == "0.0.0.0"

    from_flags = load_config(path, env=env, overrides={"server.port": 9003, "server.host": None})
    assert from_flags.server.port == 9003
    assert from_flags.server.host == "0.0.0.0"  # an unset flag (None) falls through
    assert from_flags.serving.queue_timeout_s == 6.0


def test_flag_values_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"server\.port must be in 1\.\.65535"):
        load_config(None, env={}, overrides={"server.port": 0})
    with pytest.raises(ConfigError, match=r"server\.join must be HOST:PORT"):
        load_config(None, env={}, overrides={"server.join": "leader.example"})


def test_data_dir_property(tmp_path: Path) -> None:
    config = load_config(None, env={}, overrides={"server.data_dir": str(tmp_path)})
    assert config.data_dir == tmp_path


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[bogus]\nx = 1\n", "unknown section [bogus]"),
        ("stray = 1\n", "setting 'stray' must be inside a [section]"),
        ("[autoscaling]\nkeep_alive_s = nan\n", "autoscaling.keep_alive_s must be a finite float"),
        ("[serving]\nqueue_timeout_s = inf\n", "serving.queue_timeout_s must be a finite float"),
        ("[server]\nbogus = 1\n", "unknown setting server.bogus"),
        ("[autoscaling]\nmin_instance = 1\n", "unknown setting autoscaling.min_instance"),
        ("[server.tls]\ncert = 'x'\n", "unknown setting server.tls"),
        ("[server]\nport = 8080.0\n", "server.port must be of type int"),
        ("[server]\nport = true\n", "server.port must be of type int"),
        ("[server]\nhost = 80\n", "server.host must be of type str"),
        ("[server]\napi_keys = 5\n", "server.api_keys must be a list"),
        ("[server]\napi_keys = [1]\n", "server.api_keys must be of type str"),
        ("[devices]\ncuda_devices = ['x']\n", "devices.cuda_devices must be of type int"),
        ("[serving]\nqueue_timeout_s = true\n", "serving.queue_timeout_s must be a finite float"),
        ("[serving]\nqueue_timeout_s = 'soon'\n", "serving.queue_timeout_s must be a finite float"),
    ],
)
def test_file_errors_name_the_setting(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(_write(tmp_path, text), env={})
    assert fragment in str(raised.value)


def test_section_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[server\] must be a table"):
        load_config(_write(tmp_path, "server = 1\n"), env={})


def test_invalid_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML") as raised:
        load_config(path, env={})
    assert str(path) in str(raised.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml", env={})


def test_unreadable_config_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path, env={})  # a directory


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("SLLMD_BOGUS_KEY", "1", "unknown environment setting SLLMD_BOGUS_KEY"),
        ("SLLMD_ARGS", "--join x:1", "unknown environment setting SLLMD_ARGS"),
        ("SLLMD_SERVER", "1", "unknown environment setting SLLMD_SERVER"),
        ("SLLMD_SERVER_", "1", "unknown environment setting SLLMD_SERVER_"),
        ("SLLMD_SERVER_BOGUS", "1", "unknown setting server.bogus"),
        ("SLLMD_SERVER_PORT", "http", "server.port must be of type int"),
        ("SLLMD_SERVER_PORT", "80.5", "server.port must be of type int"),
        ("SLLMD_SERVING_QUEUE_TIMEOUT_S", "1m", "serving.queue_timeout_s must be a finite float"),
        ("SLLMD_DEVICES_CUDA_DEVICES", "0,one", "devices.cuda_devices must be of type int"),
    ],
)
def test_env_errors_name_the_variable_or_setting(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, env={name: value})
    assert fragment in str(raised.value)


OUT_OF_RANGE = [
    ("server.port", 0, "server.port must be in 1..65535"),
    ("server.port", 65536, "server.port must be in 1..65535"),
    ("server.peer_port", 0, "server.peer_port must be in 1..65535"),
    ("server.peer_port", 8343, "server.port and server.peer_port must differ"),
    ("server.data_dir", "", "server.data_dir must not be empty"),
    ("server.log_level", "verbose", "server.log_level must be"),
    ("server.log_format", "xml", "server.log_format must be json|text"),
    ("server.shutdown_timeout_s", -1.0, "server.shutdown_timeout_s must be >= 0"),
    ("server.max_body_bytes", 1023, "server.max_body_bytes must be >= 1024"),
    ("server.join", "leader.example", "server.join must be HOST:PORT"),
    ("server.join", "leader.example:0", "server.join must be HOST:PORT"),
    ("server.join", ":8344", "server.join must be HOST:PORT"),
    ("devices.kind", "tpu", "devices.kind must be auto|cpu|cuda"),
    ("devices.cpu_slots", -1, "devices.cpu_slots must be in 0..1024"),
    ("devices.cpu_slots", 1025, "devices.cpu_slots must be in 0..1024"),
    ("devices.cpu_slot_memory_gb", 0.0, "devices.cpu_slot_memory_gb must be in (0, 1048576]"),
    ("devices.cpu_slot_memory_gb", 1e12, "devices.cpu_slot_memory_gb must be in (0, 1048576]"),
    ("devices.gpu_memory_reserve_gb", -1.0, "devices.gpu_memory_reserve_gb must be in 0..1024"),
    ("serving.pinned_memory_share", 1.5, "serving.pinned_memory_share must be in 0..1"),
    ("serving.max_queue_per_model", 0, "serving.max_queue_per_model must be >= 1"),
    ("serving.queue_timeout_s", 0.0, "serving.queue_timeout_s must be > 0"),
    ("serving.max_start_wait_s", 30.0, "serving.max_start_wait_s must be >= serving.queue_timeout_s"),
    ("serving.torch_threads", -1, "serving.torch_threads must be >= 0"),
    ("serving.max_batch_size", 0, "serving.max_batch_size must be in 1..4096"),
    ("serving.max_batch_kv_gb", 0.0, "serving.max_batch_kv_gb must be > 0"),
    ("store.ssd_budget_gb", 0.0, "store.ssd_budget_gb must be > 0"),
    ("store.dram_budget_gb", -1.0, "store.dram_budget_gb must be >= 0"),
    ("store.fetch_connections", 0, "store.fetch_connections must be in 1..64"),
    ("store.fetch_request_mb", 0, "store.fetch_request_mb must be in 1..4096"),
    ("store.fetch_timeout_s", 0.0, "store.fetch_timeout_s must be > 0"),
    ("store.fetch_retries", -1, "store.fetch_retries must be in 0..100"),
    ("autoscaling.min_instances", -1, "autoscaling.min_instances must be in 0..4096"),
    ("autoscaling.min_instances", 2, "autoscaling.min_instances must be <= max_instances"),
    ("autoscaling.max_instances", 0, "autoscaling.max_instances must be in 1..4096"),
    ("autoscaling.max_instances", 10**9, "autoscaling.max_instances must be in 1..4096"),
    ("autoscaling.target_concurrency", 0, "autoscaling.target_concurrency must be in 1..1048576"),
    ("autoscaling.keep_alive_s", -1.0, "autoscaling.keep_alive_s must be in 0..2.592e+06 seconds"),
    ("autoscaling.keep_alive_s", 1e308, "autoscaling.keep_alive_s must be in 0..2.592e+06 seconds"),
]


@pytest.mark.parametrize(("dotted", "value", "fragment"), OUT_OF_RANGE)
def test_out_of_range_in_file(tmp_path: Path, dotted: str, value: object, fragment: str) -> None:
    section, key = dotted.split(".")
    literal = f'"{value}"' if isinstance(value, str) else repr(value)
    with pytest.raises(ConfigError) as raised:
        load_config(_write(tmp_path, f"[{section}]\n{key} = {literal}\n"), env={})
    assert fragment in str(raised.value)


@pytest.mark.parametrize(("dotted", "value", "fragment"), OUT_OF_RANGE)
def test_out_of_range_in_env(dotted: str, value: object, fragment: str) -> None:
    name = "SLLMD_" + dotted.replace(".", "_").upper()
    with pytest.raises(ConfigError) as raised:
        load_config(None, env={name: str(value)})
    assert fragment in str(raised.value)


# -- the command line -----------------------------------------------------------------------------


def _run_sllmd(args: list[str], tmp_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLLMD_")}
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "sllmd", "--data-dir", str(tmp_path / "data"), *args],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )


@pytest.mark.parametrize(
    ("toml_text", "fragment"),
    [
        ("[server]\nprot = 8343\n", "unknown setting server.prot"),
        ("[server\n", "invalid TOML"),
        ("[devices]\nkind = 'tpu'\n", "devices.kind must be auto|cpu|cuda"),
        # Checked after load_config (the pair's check needs zmq), still before anything starts.
        (f"[cluster]\nsecret_key = '{'x' * 40}'\npublic_key = '{'y' * 40}'\n", "does not belong to secret_key"),
    ],
)
def test_cli_config_error_exits_2_with_one_line(tmp_path: Path, toml_text: str, fragment: str) -> None:
    bad = _write(tmp_path, toml_text)
    result = _run_sllmd(["--config", str(bad)], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sllmd: config error:")
    assert fragment in lines[0]
    assert not (tmp_path / "data").exists()  # nothing was started


def test_cli_env_and_flag_errors_exit_2(tmp_path: Path) -> None:
    result = _run_sllmd(["--config", str(SHIPPED)], tmp_path, {"SLLMD_ARGS": "--join leader.example:8344"})
    assert result.returncode == 2
    assert result.stderr.strip() == "sllmd: config error: unknown environment setting SLLMD_ARGS"

    result = _run_sllmd(["--config", str(SHIPPED), "--port", "8344"], tmp_path)  # the default peer port
    assert result.returncode == 2
    assert result.stderr.strip() == "sllmd: config error: server.port and server.peer_port must differ"


def test_config_is_a_leaf() -> None:
    """Every layer reads the config, so it imports no sllmd module but the shared vocabulary."""
    code = "import sys, sllmd.config; print(sorted(m for m in sys.modules if m.startswith('sllmd.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['sllmd.config', 'sllmd.types']"
