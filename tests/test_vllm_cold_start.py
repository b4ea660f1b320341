"""A vLLM cold start outlasts `serving.queue_timeout_s` on a CPU node (40-120 s here, most of it compiling) and
the request that triggered it still gets its tokens: its wait follows the start's estimate. (The node prestarts the
deployment's engine as soon as it is deployed: the request waits for that start, then its instance takes the
parked engine.) `make test-vllm`."""

from __future__ import annotations

import time

import pytest

from sllmd.scheduler.estimate import Calibration, DeviceKind
from sllmd.types import EngineKind
from tests.nodes import running_node

pytestmark = pytest.mark.vllm


async def test_the_first_request_to_a_cold_vllm_model_waits_for_its_start(demo_model_dir, tmp_path) -> None:
    pytest.importorskip("vllm")
    async with running_node(tmp_path, devices__kind="cpu", devices__cpu_slots=1, store__probe_mb=0,
                            serving__queue_timeout_s=10.0) as running:
        began = time.monotonic()
        await running.deploy("demo-vllm", demo_model_dir, backend="vllm")
        status, body = await running.complete("demo-vllm", "Hello, my name is")
        assert status == 200, body
        assert body["usage"]["completion_tokens"] > 0 and body["choices"][0]["text"]
        assert time.monotonic() - began > 10.0  # it waited past queue_timeout_s: a new vLLM engine started
        (instance,) = running.node.worker.runtimes["demo-vllm"].instances
        assert instance.load_report is not None and instance.load_report.reused_engine
        # The new engine's real duration corrected this CPU node's vLLM line alone.
        fresh, learned = Calibration.defaults(DeviceKind.CPU).init, running.node.worker.estimates.calibration.init
        assert learned[EngineKind.VLLM] != fresh[EngineKind.VLLM]
        assert learned[EngineKind.TRANSFORMERS] == fresh[EngineKind.TRANSFORMERS]
