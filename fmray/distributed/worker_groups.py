"""Worker placement groups that Ray Train 2.60 leaves reserved after a kill, and their release.

Ray keeps a placement group that an actor created until that actor's job ends. Ray Train's
controller creates one per worker group and frees it on its own shutdown paths, but two paths
miss it, both found by the ten-kills test (two such groups held 4 of 6 CPUs and the next run's
Ray Data tasks waited 25 minutes for a CPU):

- a worker that dies while its group starts, after the group's state is built (in the backend's
  set-up, for instance): the start fails, the controller never records the group, so it never
  shuts it down, and starts another one beside it. `ReleaseFailedWorkerGroup` removes the
  controller's groups when a start fails (the previous group is already shut down by then).
- a controller that ends with an error (a worker died under a controller call; fmray fits again)
  or dies with its driver: the group outlives it while the job lives. Before each fit
  `free_orphaned_worker_groups` removes the groups whose creating controller is dead.

Removing a placement group also ends the actors placed in it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ray.train.v2._internal.execution.callback import WorkerGroupCallback

# The Ray Train actor class that creates each worker group's placement group.
TRAIN_CONTROLLER_CLASS = "TrainController"


def placement_groups() -> list[Any]:
    """Every placement group in the cluster's table (Ray's protobuf records)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = state._connect_and_get_accessor().get_placement_group_table()
    return [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in table]


def is_reserved(group: Any) -> bool:
    from ray.core.generated import gcs_pb2

    return group.state != gcs_pb2.PlacementGroupTableData.REMOVED and not group.is_detached


def remove(group_id: bytes) -> bool:
    """Remove one placement group; False if it was gone meanwhile."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(group_id)))
    except Exception:  # noqa: BLE001 - removed meanwhile by Ray Train itself
        return False
    return True


def free_orphaned_worker_groups() -> list[str]:
    """Remove the reserved placement groups whose creator is a dead Ray Train controller (their
    workers died with it, so they can serve nobody); the ids removed."""
    import ray
    from ray._private.state import state

    if not ray.is_initialized():
        return []
    freed = []
    for group in placement_groups():
        creator = group.creator_actor_id
        if not is_reserved(group) or not group.creator_actor_dead or not creator.strip(b"\0"):
            continue
        name = state.actor_table(creator.hex()).get("ActorClassName", "")
        if name.rsplit(".", 1)[-1] == TRAIN_CONTROLLER_CLASS and remove(group.placement_group_id):
            freed.append(group.placement_group_id.hex())
    if freed:
        from fmray.train.metrics import print_line

        print_line(
            f"freed {len(freed)} worker placement group(s) left reserved by dead Ray Train "
            "controllers"
        )
    return freed


def release_groups_of(actor_id: bytes) -> list[str]:
    """Remove the reserved placement groups that the actor `actor_id` created; the ids."""
    freed = []
    for group in placement_groups():
        if group.creator_actor_id == actor_id and is_reserved(group):
            if remove(group.placement_group_id):
                freed.append(group.placement_group_id.hex())
    return freed


class ReleaseFailedWorkerGroup(WorkerGroupCallback):
    """Runs in Ray Train's controller: when a worker group fails to start, remove every
    placement group this controller still holds. The controller shuts its previous group down
    before it starts a new one, so at that moment each one it holds belongs to a failed start."""

    @contextmanager
    def on_worker_group_start(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            import ray

            controller = ray.get_runtime_context().get_actor_id()
            if controller is not None:
                release_groups_of(bytes.fromhex(controller))
            raise
