"""The `evaluate` task: restore a trained workdir (read-only) and evaluate it on the evaluation
split."""
import jax
import ml_collections

from vqlc import config_io, parallel
from vqlc.eval import evaluator


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """vqlc.main's `evaluate` task."""
    from vqlc.tokenizer import inference_variables
    config_io.check_compatible(config, workdir)
    mesh = parallel.make_mesh(config.mesh.data, model=config.mesh.get("model", 1))
    parallel.check_codebook_split(config.quantizer.codebook_size, mesh)
    with jax.set_mesh(mesh):  # how the codebook is split (see vqlc.parallel)
        model, variables, step = inference_variables(config, workdir, mesh)
        return evaluator.evaluate(config, workdir, model=model, variables=variables,
                                  mesh=mesh, step=step)
