"""Device slots: the units an instance occupies. One per CUDA device, or N CPU slots.

Not thread-safe: used from the event loop only.
"""

from __future__ import annotations

from dataclasses import dataclass

from sllmd.config import DevicesConfig


@dataclass(frozen=True, slots=True)
class Slot:
    index: int
    device: str  # "cpu" or "cuda:N"
    memory_bytes: int


class DeviceConfigError(RuntimeError):
    """The configured devices do not exist on this machine."""


def detect_slots(config: DevicesConfig) -> list[Slot]:
    """Slots from config: every (or each listed) visible CUDA device when kind allows, else CPU slots."""
    if config.kind in ("auto", "cuda"):
        import torch

        num_visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if num_visible:
            indices = config.cuda_devices or tuple(range(num_visible))
            missing = [i for i in indices if not 0 <= i < num_visible]
            if missing:
                raise DeviceConfigError(f"devices.cuda_devices lists {missing}, but only {num_visible} "
                                        "CUDA device(s) are visible")
            return [
                Slot(i, f"cuda:{device}", torch.cuda.get_device_properties(device).total_memory)
                for i, device in enumerate(indices)
            ]
        if config.kind == "cuda":
            raise DeviceConfigError("devices.kind is 'cuda' but no CUDA device is visible")
    memory = int(config.cpu_slot_memory_gb * (1 << 30))
    return [Slot(i, "cpu", memory) for i in range(config.cpu_slots)]


def free_device_memory(slot: Slot) -> int:
    """Bytes free on the slot's device now: the driver's figure for CUDA, the slot budget for CPU."""
    if slot.device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(slot.device))
        return int(free)
    return slot.memory_bytes


class SlotPool:
    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self._holder: dict[int, str] = {}  # slot index -> instance id

    @property
    def num_free(self) -> int:
        return len(self.slots) - len(self._holder)

    @property
    def largest_slot_bytes(self) -> int:
        return max((slot.memory_bytes for slot in self.slots), default=0)

    def acquire(self, instance_id: str, num_bytes: int) -> Slot | None:
        """A free slot with room for `num_bytes`, now held by `instance_id`; None if there is none."""
        for slot in self.slots:
            if slot.index not in self._holder and slot.memory_bytes >= num_bytes:
                self._holder[slot.index] = instance_id
                return slot
        return None

    def transfer(self, slot: Slot, instance_id: str) -> None:
        """Hand a held slot straight to another instance, so nobody else can take it in between."""
        assert slot.index in self._holder, "transfer of a free slot"
        self._holder[slot.index] = instance_id

    def release(self, slot: Slot) -> None:
        del self._holder[slot.index]

    def holder(self, slot: Slot) -> str | None:
        return self._holder.get(slot.index)
