"""A vLLM cold start outlasts `serving.queue_timeout_s` on a CPU node (40-100 s here, most of it compiling) and
the request that triggered it still gets its tokens: its wait follows the start's estimate. `make test-vllm`."""

from __future__ import annotations

import pytest

from sllmd.scheduler.estimate import Calibration, DeviceKind, EngineKind
from tests.nodes import running_node

pytestmark = pytest.mark.vllm


async def test_the_first_request_to_a_cold_vllm_model_waits_for_its_start(demo_model_dir, tmp_path) -> None:
    pytest.importorskip("vllm")
    async with running_node(tmp_path, devices__kind="cpu", devices__cpu_slots=1, store__probe_mb=0,
                            serving__queue_timeout_s=10.0) as running:
        await running.deploy("demo-vllm", demo_model_dir, backend="vllm")
        status, body = await running.complete("demo-vllm", "Hello, my name is")
        assert status == 200, body
        assert body["usage"]["completion_tokens"] > 0 and body["choices"][0]["text"]
        # The start was estimated from this CPU node's vLLM line (tens of seconds), not the transformers one ...
        (instance,) = running.node.worker.runtimes["demo-vllm"].instances
        assert instance.estimated_start_s > 10.0
        # ... and its real duration corrected that line alone.
        fresh, learned = Calibration.defaults(DeviceKind.CPU).init, running.node.worker.estimates.calibration.init
        assert learned[EngineKind.VLLM] != fresh[EngineKind.VLLM]
        assert learned[EngineKind.TRANSFORMERS] == fresh[EngineKind.TRANSFORMERS]
