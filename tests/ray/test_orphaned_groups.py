"""Worker placement groups left reserved by dead Ray Train controllers are freed before a fit."""

from __future__ import annotations

import time

import pytest


def wait_dead(ray, actor, timeout_s: float = 30.0) -> None:
    from ray._private.state import state

    deadline = time.monotonic() + timeout_s
    while state.actor_table(actor._actor_id.hex()).get("State") != "DEAD":
        if time.monotonic() > deadline:
            pytest.fail("the killed actor never showed as dead")
        time.sleep(0.2)


def test_a_dead_controllers_group_is_freed_and_no_other(ray_cluster) -> None:
    ray = ray_cluster
    from ray.util.placement_group import placement_group, remove_placement_group

    from fmray.distributed.worker_groups import free_orphaned_worker_groups

    def reserve(self):
        group = placement_group([{"CPU": 0.01}])
        ray.get(group.ready(), timeout=30)
        return group

    # Named as Ray Train's controller class, and another actor class that reserves the same way.
    train_controller = ray.remote(num_cpus=0)(type("TrainController", (), {"reserve": reserve}))
    other_actor = ray.remote(num_cpus=0)(type("Reserver", (), {"reserve": reserve}))

    dead_controller, live_controller, dead_other = (
        train_controller.remote(),
        train_controller.remote(),
        other_actor.remote(),
    )
    orphan = ray.get(dead_controller.reserve.remote())
    in_use = ray.get(live_controller.reserve.remote())
    not_ours = ray.get(dead_other.reserve.remote())
    drivers = placement_group([{"CPU": 0.01}])
    ray.get(drivers.ready(), timeout=30)
    ray.kill(dead_controller)
    ray.kill(dead_other)
    wait_dead(ray, dead_controller)
    wait_dead(ray, dead_other)

    freed = free_orphaned_worker_groups()

    def state_of(group) -> str:
        return ray.util.placement_group_table(group)["state"]

    assert orphan.id.hex() in freed
    assert state_of(orphan) == "REMOVED"
    for kept in (in_use, not_ours, drivers):
        assert kept.id.hex() not in freed
        assert state_of(kept) == "CREATED"
    for group in (in_use, not_ours, drivers):
        remove_placement_group(group)
    ray.kill(live_controller)


def test_a_failed_start_releases_the_controllers_groups_only(ray_cluster) -> None:
    """Ray Train 2.60 forgets a worker group whose start failed after its state was built; the
    callback, run in the controller, removes what that controller still holds."""
    ray = ray_cluster
    from ray.util.placement_group import placement_group, remove_placement_group

    @ray.remote(num_cpus=0)
    class Controller:
        def start_fails(self) -> tuple:
            from fmray.distributed.worker_groups import ReleaseFailedWorkerGroup

            group = placement_group([{"CPU": 0.01}])
            ray.get(group.ready(), timeout=30)
            try:
                with ReleaseFailedWorkerGroup().on_worker_group_start():
                    raise RuntimeError("a worker died during the backend set-up")
            except RuntimeError as error:
                return group, str(error)

        def start_works(self):
            from fmray.distributed.worker_groups import ReleaseFailedWorkerGroup

            with ReleaseFailedWorkerGroup().on_worker_group_start():
                group = placement_group([{"CPU": 0.01}])
                ray.get(group.ready(), timeout=30)
            return group

    other = placement_group([{"CPU": 0.01}])
    ray.get(other.ready(), timeout=30)
    controller = Controller.remote()
    started = ray.get(controller.start_works.remote())
    failed, error = ray.get(controller.start_fails.remote())
    table = ray.util.placement_group_table
    assert error == "a worker died during the backend set-up"  # re-raised for Ray Train
    assert table(failed)["state"] == "REMOVED"
    assert table(started)["state"] == "REMOVED"  # the controller's earlier group too
    assert table(other)["state"] == "CREATED"
    remove_placement_group(other)
    ray.kill(controller)
