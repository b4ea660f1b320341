"""The leader's startup-time placement migrates a running instance when that starts a cold model soonest.

Two real `sllmd` processes with one device each, whose memory holds one instance of either model but not
both. Node n1 holds a ~1 GB checkpoint on its SSD and its device is busy streaming the demo model; n2 has
room but would first have to fetch the
checkpoint from n1 over a link configured as slow (0.1 GB/s: ~10 s for the big model, against ~3 s for
a migration and a load from n1's SSD, so the choice does not hinge on this machine's timing). A request
for the big model entering at n2 is placed on n1, the demo model's running instance migrates to n2 (its
stream goes on, identical), and the big model starts from n1's SSD.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from sllmd.scheduler.estimate import Calibration
from sllmd.scheduler.placement import NodeState, plan_checkpoint_homes
from tests.test_cluster import Member, running_cluster, wait_until

KEEP = {"max_instances": 1, "keep_alive_s": 300}


def big_model(demo_model_dir: Path, dst: Path) -> Path:
    """A ~0.95 GB fp32 Llama with the demo model's tokenizer and vocabulary (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    demo = json.loads((demo_model_dir / "config.json").read_text())
    config = LlamaConfig(vocab_size=demo["vocab_size"], hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=14, num_attention_heads=16, num_key_value_heads=16, head_dim=64,
                         max_position_embeddings=512, bos_token_id=demo.get("bos_token_id"),
                         eos_token_id=demo.get("eos_token_id"))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(dst)
    for name in os.listdir(demo_model_dir):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(demo_model_dir / name, dst / name)
    return dst


def home_on(node_id: str, nodes: list[str], prefix: str) -> str:
    """A model name whose single checkpoint home (rendezvous hashing) is `node_id`."""
    states = [NodeState(n, True, (), Calibration.defaults(), free_ssd_bytes=1 << 40) for n in nodes]
    return next(name for name in (f"{prefix}-{i}" for i in range(100))
                if plan_checkpoint_homes(name, 0, states, 1) == [node_id])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[Member]]:
    # No probes: the slow link must not be measured away. With a KV budget of 0.05 GiB, an instance of the
    # big model asks 1.00 GiB (0.88 of weights, 0.05 of KV, 0.06 of overhead) and the demo's 0.11 GiB: a
    # device of 1.06 GiB holds one of either, not both.
    env = {"SLLMD_DEVICES_CPU_SLOTS": "1", "SLLMD_DEVICES_CPU_SLOT_MEMORY_GB": "1.06",
           "SLLMD_SERVING_MAX_BATCH_KV_GB": "0.05", "SLLMD_CLUSTER_CHECKPOINT_COPIES": "1",
           "SLLMD_CLUSTER_PEER_LINK_GBPS": "0.1", "SLLMD_STORE_PROBE_MB": "0"}
    with running_cluster(tmp_path, ["n1", "n2"], env=env) as members:
        yield members


def instance_nodes(members: list[Member], model: str) -> list[str]:
    return [m.node_id for m in members for _ in m.get(f"/admin/models/{model}")["instances"]]


def test_a_busy_device_beside_the_fast_copy_is_freed_by_migrating_its_instance(cluster, demo_model_dir, tmp_path):
    n1, n2 = cluster
    names = [m.node_id for m in cluster]
    small, big = home_on("n1", names, "small"), home_on("n1", names, "big")
    for name, source in ((small, demo_model_dir), (big, big_model(demo_model_dir, tmp_path / "big"))):
        reply = n1.post("/admin/models", {"name": name, "checkpoint": str(source), "autoscaling": KEEP}, timeout_s=120)
        assert reply.status_code == 201, reply.text
    wait_until(lambda: {small, big} <= n2.models(), 5, "both models on n2", cluster)

    # Long enough (~8 s here) that the placement below happens while it streams.
    body = {"model": small, "prompt": "Once upon", "max_tokens": 800, "temperature": 0, "stream": True}
    reference = n1.post("/v1/completions", {**body, "stream": False}, timeout_s=120).json()["choices"][0]["text"]
    assert instance_nodes(cluster, small) == ["n1"]  # on n1's one device
    wait_until(lambda: any(n["id"] == "n1" and n["instances"] for n in n2.get("/admin/cluster")["nodes"]), 5,
               "n1's instance in n2's view", cluster)

    streamed: list[str] = []
    progressed = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{n1.url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event: Any = json.loads(line[6:])
                    streamed.append(event["choices"][0]["text"])
                    if len(streamed) == 10:
                        progressed.set()
                elif line == "data: [DONE]":
                    streamed.append("[DONE]")

    reader = threading.Thread(target=stream)
    reader.start()
    assert progressed.wait(60)
    wait_until(lambda: any(i["requests"] for n in n2.get("/admin/cluster")["nodes"] if n["id"] == "n1"
                           for i in n["instances"]), 10, "the busy instance in n2's view", cluster)
    reply = n2.post("/v1/completions", {"model": big, "prompt": "Hi", "max_tokens": 2}, timeout_s=120)
    assert reply.status_code == 200, reply.text
    reader.join(120)

    assert streamed[-1] == "[DONE]" and "".join(streamed[:-1]) == reference  # one uninterrupted, identical stream
    leader = n1 if n1.get("/admin/cluster")["leader"] == "n1" else n2
    placements = [line for line in leader.log().splitlines() if "placed a new instance" in line]
    assert instance_nodes(cluster, big) == ["n1"] and instance_nodes(cluster, small) == ["n2"], placements
    assert re.search(rf"placed a new instance model={big} node=n1 tier=ssd .*migrations=1", leader.log())

