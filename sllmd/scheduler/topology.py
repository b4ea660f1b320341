"""Which devices of a node an instance spanning several of them should take: pure, over a distance matrix.

`distance[i][j]` is how far apart devices i and j are: NVML's topology levels (0 the same board or NVLink,
10 one PCIe switch, 20 several switches, 30 one host bridge, 40 one NUMA node, 50 across sockets), read by
`worker.devices.read_topology`; an empty matrix is a flat set (CPU devices, or no NVML), every pair alike.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

Distance = Sequence[Sequence[int]]
MAX_GROUPS = 4096  # beyond this many k-subsets (C(16, 8) is 12870), only each device's nearest k are weighed


def device_groups(num_devices: int, k: int, distance: Distance = ()) -> list[tuple[int, ...]]:
    """The sets of `k` of a node's `num_devices` devices, in order of preference: the farthest pair in the set
    closest first (one NVLink island or PCIe switch before a set that crosses sockets), then the smallest sum
    of pairwise distances, then the lowest indices. `k` of 1: each device alone, in index order. None when
    the node has fewer than `k` devices (an empty list)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > num_devices:
        return []
    if k == 1:
        return [(device,) for device in range(num_devices)]

    def far(i: int, j: int) -> int:
        return distance[i][j] if distance else 0

    def key(group: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
        pairs = [far(i, j) for i, j in itertools.combinations(group, 2)]
        return max(pairs), sum(pairs), group

    if math.comb(num_devices, k) <= MAX_GROUPS:
        groups = set(itertools.combinations(range(num_devices), k))
    else:  # too many sets to weigh: each device with its k - 1 nearest
        groups = {tuple(sorted(sorted(range(num_devices), key=lambda other: (far(seed, other), other))[:k]))
                  for seed in range(num_devices)}
    return sorted(groups, key=key)
