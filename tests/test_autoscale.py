from sllmd.scheduler.autoscale import AutoscalingPolicy, num_instances_to_start, num_instances_wanted, pick_instance


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
