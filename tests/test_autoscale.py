import pytest

from sllmd.scheduler.autoscale import cold_start_wait_s, num_instances_to_start, num_instances_wanted, pick_instance
from sllmd.types import AutoscalingPolicy


def test_scale_from_zero_wants_one_instance_for_the_first_request():
    policy = AutoscalingPolicy(min_instances=0, max_instances=4, target_concurrency=4)
    assert num_instances_wanted(policy, 0) == 0
    assert num_instances_wanted(policy, 1) == 1
    assert num_instances_to_start(policy, demand=1, num_live=0, num_startable=2) == 1


def test_scale_out_follows_demand_over_target_and_is_clamped():
    policy = AutoscalingPolicy(min_instances=1, max_instances=3, target_concurrency=2)
    assert num_instances_wanted(policy, 0) == 1  # min_instances holds even with no demand
    assert num_instances_wanted(policy, 5) == 3
    assert num_instances_wanted(policy, 100) == 3  # max_instances caps it
    assert num_instances_to_start(policy, demand=5, num_live=1, num_startable=1) == 1  # capacity caps it
    assert num_instances_to_start(policy, demand=5, num_live=3, num_startable=4) == 0


def test_pick_instance_packs_onto_the_busiest_under_target_so_surplus_drains():
    assert pick_instance([0, 2, 1], target_concurrency=4) == 1
    assert pick_instance([4, 0], target_concurrency=4) == 1
    assert pick_instance([5, 4, 6], target_concurrency=4) == 1  # all at target: least busy
    assert pick_instance([1, 1], target_concurrency=4) == 0  # ties: lowest index


def test_policy_problems_name_the_field():
    assert AutoscalingPolicy().problems() == []
    fields = {field for field, _ in AutoscalingPolicy(2, 1, 0, -1).problems()}
    assert fields == {"min_instances", "target_concurrency", "keep_alive_s"}


def test_instances_on_other_nodes_count_against_max_instances():
    policy = AutoscalingPolicy(max_instances=3, target_concurrency=1)
    assert num_instances_to_start(policy, demand=4, num_live=1, num_startable=4, num_elsewhere=1) == 1
    assert num_instances_to_start(policy, demand=4, num_live=1, num_startable=4, num_elsewhere=2) == 0
    assert num_instances_to_start(policy, demand=4, num_live=1, num_startable=4, num_elsewhere=5) == 0  # never < 0


# (waited_s, starts as (estimated_s, running_s), the wait bound in seconds since the request began waiting),
# with queue_timeout_s 60 and max_start_wait_s 600; a start counts as stuck at 2 × its estimate + 30 s.
@pytest.mark.parametrize(("waited_s", "starts", "bound_s"), [
    (0.0, [], 60.0),  # nothing starting (no free slot): the queue timeout
    (70.0, [], 60.0),  # ... also once it has passed
    (0.0, [(0.5, 0.0)], 60.0),  # a sub-second transformers start: never less than the queue timeout
    (0.0, [(40.0, 0.0)], 110.0),  # a vLLM start on CPU, begun for this request
    (50.0, [(40.0, 50.0)], 110.0),  # ... asked again later: the same bound
    (0.0, [(40.0, 30.0)], 80.0),  # joined a start 30 s in: until it counts as stuck
    (0.0, [(40.0, 100.0)], 60.0),  # joined a start already past its bound: the queue timeout still
    (20.0, [(40.0, 0.0)], 130.0),  # waited 20 s for a slot, then the start began
    (0.0, [(40.0, 100.0), (40.0, 10.0)], 100.0),  # the start that counts as stuck last decides
    (0.0, [(400.0, 0.0)], 600.0),  # never more than max_start_wait_s
    (550.0, [(400.0, 0.0)], 600.0),  # ... counted from when the request began waiting
])
def test_a_request_waits_through_a_start_as_long_as_it_is_within_its_estimate(waited_s, starts, bound_s):
    assert cold_start_wait_s(60.0, 600.0, waited_s=waited_s, starts=starts) == pytest.approx(bound_s)
