"""This node's devices as memory budgets, and the memory each instance holds on one of them.

A device is a CUDA GPU or a CPU device (`devices.cpu_slots` of them, each `cpu_slot_memory_gb`). Its budget
is what instances may hold on it: on CUDA the memory free when the node started, less
`devices.gpu_memory_reserve_gb`; on CPU the configured figure. Several instances share a device while their
holds fit its budget.

Not thread-safe: used from the event loop only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sllmd.config import DevicesConfig
from sllmd.scheduler.topology import Distance, device_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Device:
    index: int
    name: str  # "cpu" or "cuda:N": what engines are built on
    budget_bytes: int


class DeviceConfigError(RuntimeError):
    """The configured devices do not exist on this machine."""


def detect_devices(config: DevicesConfig) -> list[Device]:
    """Devices from config: every (or each listed) visible CUDA device when kind allows, else CPU devices."""
    if config.kind in ("auto", "cuda"):
        import torch

        num_visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if num_visible:
            indices = config.cuda_devices or tuple(range(num_visible))
            missing = [i for i in indices if not 0 <= i < num_visible]
            if missing:
                raise DeviceConfigError(f"devices.cuda_devices lists {missing}, but only {num_visible} "
                                        "CUDA device(s) are visible")
            reserve = int(config.gpu_memory_reserve_gb * (1 << 30))
            devices = []
            for i, cuda_index in enumerate(indices):
                free, _ = torch.cuda.mem_get_info(cuda_index)  # what other processes hold is not ours
                devices.append(Device(i, f"cuda:{cuda_index}", max(0, int(free) - reserve)))
            return devices
        if config.kind == "cuda":
            raise DeviceConfigError("devices.kind is 'cuda' but no CUDA device is visible")
    budget = int(config.cpu_slot_memory_gb * (1 << 30))
    return [Device(i, "cpu", budget) for i in range(config.cpu_slots)]


def read_topology(devices: list[Device]) -> tuple[tuple[int, ...], ...]:
    """Distances between the CUDA `devices` (`scheduler.topology`): 0 between NVLink peers, else NVML's level
    of their closest common PCIe ancestor. Empty (a flat set) for CPU devices, a single GPU, or where NVML
    (the nvidia-ml-py package) is not installed or cannot tell."""
    if len(devices) < 2 or not devices[0].name.startswith("cuda"):
        return ()
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        handles = []
        for device in devices:
            props = torch.cuda.get_device_properties(int(device.name.partition(":")[2]))
            bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            handles.append(pynvml.nvmlDeviceGetHandleByPciBusId_v2(bus_id))

        def distance(a: object, b: object) -> int:
            if a is b:
                return 0
            nvlink = pynvml.nvmlDeviceGetP2PStatus(a, b, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
            return 0 if nvlink == pynvml.NVML_P2P_STATUS_OK else int(pynvml.nvmlDeviceGetTopologyCommonAncestor(a, b))

        return tuple(tuple(distance(a, b) for b in handles) for a in handles)
    except Exception as exc:  # no NVML, an old driver, a torch without PCI ids: placement treats GPUs alike
        log.warning("GPU topology unknown; device sets are chosen as a flat set", extra={"error": repr(exc)})
        return ()


class DevicePool:
    """Which holder (an instance id) holds how many bytes on which devices (one, or a set for an instance
    spanning several; the same bytes on each)."""

    def __init__(self, devices: list[Device], topology: Distance = ()) -> None:
        """`topology`: distances between the devices (`scheduler.topology`); empty: a flat set."""
        self.devices = devices
        self.topology = tuple(tuple(row) for row in topology)
        self._holds: dict[str, tuple[tuple[Device, ...], int]] = {}  # holder -> (devices, bytes on each)

    def held_bytes(self, device: Device) -> int:
        return sum(num_bytes for held_on, num_bytes in self._holds.values() if device in held_on)

    def free_bytes(self, device: Device) -> int:
        return device.budget_bytes - self.held_bytes(device)

    def free_by_device(self) -> tuple[int, ...]:
        """Free bytes of every device, in device order."""
        return tuple(self.free_bytes(device) for device in self.devices)

    def hold_of(self, holder: str) -> tuple[tuple[Device, ...], int] | None:
        return self._holds.get(holder)

    def acquire(self, holder: str, num_bytes: int, num_devices: int = 1) -> tuple[Device, ...] | None:
        """Hold `num_bytes` on each of `num_devices` devices for `holder`; None when no such set has room. One
        device: the one with the least free memory that fits (best fit: the large holes stay for large models),
        the lowest index on ties. Several: the set closest in the topology (`topology.device_groups`) whose
        devices all fit."""
        fitting = [tuple(self.devices[i] for i in group)
                   for group in device_groups(len(self.devices), num_devices, self.topology)
                   if all(self.free_bytes(self.devices[i]) >= num_bytes for i in group)]
        if not fitting:
            return None
        chosen = min(fitting, key=lambda group: (self.free_bytes(group[0]), group[0].index)) if num_devices == 1 \
            else fitting[0]
        self._holds[holder] = (chosen, num_bytes)
        return chosen

    def take_over(self, devices: tuple[Device, ...], holder: str, num_bytes: int, from_holders: list[str]) -> None:
        """Release `from_holders`' holds (instances being evicted: their engines free the memory as they stop)
        and hold `num_bytes` on each of `devices` for `holder` in the same step, so nobody else takes that memory
        in between. The caller checked that it fits."""
        for previous in from_holders:
            self._holds.pop(previous, None)
        assert all(self.free_bytes(device) >= num_bytes for device in devices), "take_over past a device's budget"
        self._holds[holder] = (devices, num_bytes)

    def resize(self, holder: str, num_bytes: int) -> None:
        """Make `holder`'s hold `num_bytes` on each of its devices (what its started instance really holds,
        measured), even past the budget: the memory is in use whether it fits the estimate or not. No hold:
        nothing to do."""
        if (hold := self._holds.get(holder)) is not None:
            self._holds[holder] = (hold[0], num_bytes)

    def release(self, holder: str) -> None:
        """Drop `holder`'s hold, if it has one (one taken over by another holder has none)."""
        self._holds.pop(holder, None)


def engine_device(devices: tuple[Device, ...]) -> str:
    """What an engine is built on for an instance on `devices`: "cpu", "cuda:N", or "cuda:N,M,..." for one
    spanning several GPUs."""
    if devices[0].name == "cpu":
        return "cpu"
    return "cuda:" + ",".join(device.name.partition(":")[2] for device in devices)
