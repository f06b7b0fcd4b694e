"""The `evaluate` task: restore a trained workdir and evaluate it on the evaluation split."""
import ml_collections

from vqlc import checkpoint, config_io, parallel
from vqlc.eval import evaluator


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict:
    from vqlc.train.trainer import model_variables, setup_model
    config_io.check_compatible(config, workdir)
    mesh = parallel.make_mesh(config.mesh.data)
    model, _, _, _, state, frozen = setup_model(config, workdir, mesh, abstract=True)
    state, step = checkpoint.restore_state_only(f"{workdir}/checkpoints", state)
    return evaluator.evaluate(config, workdir, model=model, variables=model_variables(state, frozen),
                              mesh=mesh, step=step)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """vqlc.main's `evaluate` task."""
    return evaluate_workdir(config, workdir)
