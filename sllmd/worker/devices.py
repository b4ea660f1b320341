"""This node's devices as memory budgets, and the memory each instance holds on one of them.

A device is a CUDA GPU or a CPU device (`devices.cpu_slots` of them, each `cpu_slot_memory_gb`). Its budget
is what instances may hold on it: on CUDA the memory free when the node started, less
`devices.gpu_memory_reserve_gb`; on CPU the configured figure. Several instances share a device while their
holds fit its budget.

Not thread-safe: used from the event loop only.
"""

from __future__ import annotations

from dataclasses import dataclass

from sllmd.config import DevicesConfig


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


class DevicePool:
    """Which holder (an instance id) holds how many bytes on which device."""

    def __init__(self, devices: list[Device]) -> None:
        self.devices = devices
        self._holds: dict[str, tuple[Device, int]] = {}  # holder -> (device, bytes)

    @property
    def largest_budget_bytes(self) -> int:
        return max((device.budget_bytes for device in self.devices), default=0)

    def held_bytes(self, device: Device) -> int:
        return sum(num_bytes for held_on, num_bytes in self._holds.values() if held_on is device)

    def free_bytes(self, device: Device) -> int:
        return device.budget_bytes - self.held_bytes(device)

    def free_by_device(self) -> tuple[int, ...]:
        """Free bytes of every device, in device order."""
        return tuple(self.free_bytes(device) for device in self.devices)

    def hold_of(self, holder: str) -> tuple[Device, int] | None:
        return self._holds.get(holder)

    def acquire(self, holder: str, num_bytes: int) -> Device | None:
        """Hold `num_bytes` for `holder` on the device with the least free memory that fits them (best fit: the
        large holes stay for large models), the lowest index on ties; None when none has room."""
        fitting = [(self.free_bytes(d), d.index, d) for d in self.devices if self.free_bytes(d) >= num_bytes]
        if not fitting:
            return None
        device = min(fitting, key=lambda entry: entry[:2])[2]
        self._holds[holder] = (device, num_bytes)
        return device

    def take_over(self, device: Device, holder: str, num_bytes: int, from_holders: list[str]) -> None:
        """Release `from_holders`' holds (instances being evicted: their engines free the memory as they stop)
        and hold `num_bytes` on `device` for `holder` in the same step, so nobody else takes that memory in
        between. The caller checked that it fits."""
        for previous in from_holders:
            self._holds.pop(previous, None)
        assert self.free_bytes(device) >= num_bytes, "take_over past the device's budget"
        self._holds[holder] = (device, num_bytes)

    def resize(self, holder: str, num_bytes: int) -> None:
        """Make `holder`'s hold `num_bytes` (what its started instance really holds, measured), even past the
        budget: the memory is in use whether it fits the estimate or not. No hold: nothing to do."""
        if (hold := self._holds.get(holder)) is not None:
            self._holds[holder] = (hold[0], num_bytes)

    def release(self, holder: str) -> None:
        """Drop `holder`'s hold, if it has one (one taken over by another holder has none)."""
        self._holds.pop(holder, None)
