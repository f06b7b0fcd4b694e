"""Orbax checkpoints of the train state and the data iterator, with automatic resume.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed during a save still has its previous checkpoint intact.
"""
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"


def make_manager(workdir: str, *, keep: int, save_interval: int = 1) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_interval, create=True,
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options, item_names=(STATE, DATA))


def _has_grain_state(it) -> bool:
    return hasattr(it, "get_state") and hasattr(it, "set_state")


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None, *,
         force: bool = False) -> bool:
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None and _has_grain_state(data_iterator):
        items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    manager.wait_until_finished()
    return saved


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator=None):
    """Restores the newest complete checkpoint into `abstract_state`'s shapes and shardings.

    Returns the restored state, or None when the workdir has no checkpoint. The data iterator,
    when given, is moved to the position it had at that step.
    """
    step = manager.latest_step()
    if step is None:
        return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    items = {STATE: ocp.args.StandardRestore(target)}
    has_data = os.path.isdir(os.path.join(str(manager.directory), str(step), DATA))
    if data_iterator is not None and _has_grain_state(data_iterator) and has_data:
        items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Resumed from checkpoint at step %d", step)
    return restored[STATE]


def restore_state_only(checkpoint_dir: str, abstract_state, step: int | None = None):
    """Reads just the train state (e.g. for inference), newest step unless `step` is given."""
    manager = ocp.CheckpointManager(checkpoint_dir, item_names=(STATE, DATA))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint found in {checkpoint_dir!r}.")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(target)}))
    return restored[STATE], step
