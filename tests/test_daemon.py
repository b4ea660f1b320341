"""The real `sllmd` process: systemd readiness, graceful SIGTERM, restart persistence, and one-line
startup errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sllmd.scheduler.estimate import Calibration
from sllmd.types import EngineKind, Tier
from tests.nodes import free_port


class Daemon:
    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "sllmd", "--data-dir", str(data_dir), "--port", str(self.port),
                   "--peer-port", str(free_port()), *args]
        self.process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("daemon did not become ready")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def run_to_exit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sllmd", *args], capture_output=True, text=True, timeout=60)


def test_notify_ready_then_graceful_stop_then_restart_serves_the_same_deployments(demo_model_dir, tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(60)
    data_dir = tmp_path / "data"
    daemon = Daemon(data_dir, "--deploy", f"demo={demo_model_dir}", env={"NOTIFY_SOCKET": notify_path})
    try:
        assert notify.recv(64) == b"READY=1"
        # READY means the port is bound: the very first request must connect.
        assert httpx.get(f"{daemon.url}/health", timeout=5).status_code == 200

        # Startup errors are one line and a non-zero exit, and leave the running daemon alone.
        locked = run_to_exit("--data-dir", str(data_dir), "--port", str(free_port()))
        assert locked.returncode == 1
        assert locked.stderr.strip().splitlines() == [f"sllmd: data dir {data_dir} is in use by another sllmd "
                                                      f"(pid {daemon.process.pid})"]
        taken = run_to_exit("--data-dir", str(tmp_path / "other"), "--port", str(daemon.port))
        assert taken.returncode == 1
        *logged, reason = taken.stderr.strip().splitlines()  # the start-time probe logged before the bind
        assert reason.startswith(f"sllmd: cannot listen on 127.0.0.1:{daemon.port}")
        assert all(json.loads(line)["level"] == "info" for line in logged)

        # SIGTERM while a stream is in flight: the stream still completes, then the process exits 0.
        body = {"model": "demo", "prompt": "Hello", "max_tokens": 64, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{daemon.url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["choices"][0]["text"] is not None
            daemon.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert sum(1 for line in [first, *rest] if '"text"' in line) >= 2
        assert daemon.process.wait(timeout=30) == 0
        assert notify.recv(64) == b"STOPPING=1"
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
        notify.close()

    restarted = Daemon(data_dir)  # no --deploy: the deployment comes from LMDB
    try:
        restarted.wait_ready()
        assert [m["id"] for m in httpx.get(f"{restarted.url}/v1/models").json()["data"]] == ["demo"]
        reply = httpx.post(f"{restarted.url}/v1/completions", json={"model": "demo", "prompt": "Hi", "max_tokens": 4},
                           timeout=30)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
        # The start-time probe replaced the default load bandwidths; the cold start was estimated and scored.
        reported = Calibration.from_wire(httpx.get(f"{restarted.url}/admin/cluster").json()["nodes"][0]["calibration"])
        assert reported.load_gbps[Tier.SSD] != Calibration.defaults().load_gbps[Tier.SSD]
        metrics = httpx.get(f"{restarted.url}/metrics").text
        ssd_gbps, vllm_init_s = reported.load_gbps[Tier.SSD], reported.init[EngineKind.VLLM].intercept
        assert f'sllmd_estimator{{engine_kind="",quantity="load_gbps",tier="ssd"}} {ssd_gbps}' in metrics
        assert f'sllmd_estimator{{engine_kind="vllm",quantity="init_intercept_s",tier=""}} {vllm_init_s}' in metrics
        assert 'sllmd_start_estimate_error_seconds_count{tier="ssd"} 1.0' in metrics
        assert restarted.stop() == 0
    finally:
        if restarted.process.poll() is None:
            restarted.process.kill()


@pytest.mark.parametrize(("args", "message"), [
    (["--deploy", "nodir"], "--deploy expects NAME=SOURCE"),
    (["--deploy", "..=/tmp"], "--deploy '..': the name must not be . or .."),
    (["--port", "0"], "sllmd: config error: server.port must be in 1..65535"),
    (["--join", "leader"], "sllmd: config error: server.join must be HOST:PORT"),
])
def test_bad_arguments_exit_nonzero_with_a_reason(tmp_path, args, message):
    result = run_to_exit("--data-dir", str(tmp_path), *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_deploying_a_bad_directory_at_start_fails_in_one_line(tmp_path):
    result = run_to_exit("--data-dir", str(tmp_path / "data"), "--port", str(free_port()),
                         "--deploy", f"demo={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"sllmd: {tmp_path} has no config.json (expected a Hugging " \
        "Face model directory)"
