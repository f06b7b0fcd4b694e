"""Orbax checkpoints of the train state and the data iterator, with automatic resume.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed during a save (kill -9, a lost node) still has its previous checkpoint intact; the
half-written temporary directory it leaves is removed, and logged, when the next run starts.
"""
import logging

import jax

from vqlc import extras

with extras.needed("train", "checkpoints"):
    import grain
    import orbax.checkpoint as ocp

from vqlc import rundir, storage

STATE, DATA = "state", "data"
# Orbax's in-progress save directories: <step>.orbax-checkpoint-tmp[-<timestamp>].
_TMP_MARK = ".orbax-checkpoint-tmp"


def make_manager(workdir: str, *, keep: int, save_interval: int = 1) -> ocp.CheckpointManager:
    directory = rundir.checkpoints(workdir)
    remove_unfinished_saves(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_interval, create=True,
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options, item_names=(STATE, DATA))


def remove_unfinished_saves(directory: str) -> list[str]:
    """Deletes (on process 0) the temporary directories of saves that never completed (a
    process killed mid-save); returns their names there. Orbax never restores from them, but each holds up to a
    full checkpoint's bytes, and orbax itself removes one only when it saves that step again."""
    removed = []
    if jax.process_index() == 0:
        removed = [n for n in storage.listdir(directory) if _TMP_MARK in n]
        for name in removed:
            logging.warning("Removing %s: an unfinished checkpoint save (the process was killed "
                            "while writing it); resuming from the last complete one.",
                            rundir.join(directory, name))
            storage.remove(rundir.join(directory, name))
    # Every process, unconditionally (what the others see of the directory can differ while
    # process 0 creates or cleans it): nobody saves before process 0 has cleaned up.
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("vqlc_remove_unfinished_saves")
    return removed


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
    check_matches(manager, step, target)
    items = {STATE: ocp.args.StandardRestore(target)}
    has_data = storage.isdir(rundir.join(manager.directory, str(step), DATA))
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


def _shapes_by_path(tree) -> dict[str, tuple]:
    """{'g_params/encoder/conv_in/kernel': shape} for a state pytree or orbax's metadata tree."""
    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves
            if hasattr(leaf, "shape")}


def check_matches(manager: ocp.CheckpointManager, step: int, target) -> None:
    """Refuses, before any restore, a checkpoint whose arrays do not fit `target`: a workdir
    holding a run of another model (which config.json would name, when it exists)."""
    try:
        path = manager.directory / str(step) / STATE
        stored = _shapes_by_path(ocp.StandardCheckpointHandler().metadata(path).tree)
    except Exception as e:  # unreadable metadata: let the restore itself report it
        logging.warning("Could not read the metadata of checkpoint %d (%s).", step, e)
        return
    wanted = _shapes_by_path(target)
    diffs = [f"{k}: checkpoint {stored.get(k, 'missing')} vs config {wanted.get(k, 'missing')}"
             for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    if diffs:
        raise ValueError(
            f"The checkpoint at step {step} in {str(manager.directory)!r} is of a different "
            f"model than this config ({len(diffs)} arrays differ, e.g. "
            f"{'; '.join(diffs[:3])}). Use a new --workdir, or the settings that run used.")


def latest_step(workdir: str) -> int | None:
    """The step a run in `workdir` resumes from (as restore_latest sees it), None for a fresh
    run. Reads only: nothing is created or cleaned, so it may run before settings are checked."""
    manager = ocp.CheckpointManager(
        rundir.checkpoints(workdir), item_names=(STATE, DATA),
        options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        return manager.latest_step()
    finally:
        manager.close()


def completed_steps(checkpoint_dir: str) -> list[int]:
    """Steps with a complete save in `checkpoint_dir` (orbax renames a save's directory to its
    bare step number only when it is complete), oldest first; reads only."""
    return sorted(int(n) for n in storage.listdir(checkpoint_dir)
                  if n.isdigit() and storage.isdir(rundir.join(checkpoint_dir, n, STATE)))


def restore_subtrees(checkpoint_dir: str, targets: dict, step: int | None = None):
    """Reads only the named fields of a saved train state (e.g. {'g_params': ..., 'ema': ...}
    for inference: no optimiser, no discriminator), into `targets`' shapes and shardings.

    Returns (restored dict, step). Writes nothing: a workdir that another process is training
    in can be read. A field whose arrays differ in shape from `targets` is refused."""
    steps = completed_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"No checkpoint found in {checkpoint_dir!r}.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"No checkpoint for step {step} in {checkpoint_dir!r}; it holds "
                                f"steps {steps}.")
    path = rundir.join(checkpoint_dir, str(step), STATE)
    checkpointer = ocp.PyTreeCheckpointer()
    stored = _shapes_by_path(checkpointer.metadata(path).item_metadata.tree)
    wanted = _shapes_by_path(targets)
    diffs = [f"{k}: checkpoint {stored.get(k, 'missing')} vs config {v}"
             for k, v in sorted(wanted.items()) if stored.get(k) != v]
    if diffs:
        raise ValueError(f"The checkpoint at step {step} in {checkpoint_dir!r} does not fit this "
                         f"config ({len(diffs)} arrays differ, e.g. {'; '.join(diffs[:3])}).")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, targets)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    return {k: restored[k] for k in targets}, step
