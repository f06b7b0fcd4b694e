"""The paper-size GPT configs (and DiT-LC's, SiT-LC's) build the models the README and the
paper name, with the schedule arithmetic and samplers their docstrings state (shapes only:
nothing is allocated)."""
import pytest

from vqlc.configs import (dit_lc_imagenet, gpt_lc_ffhq, gpt_lc_imagenet, llamagen_imagenet,
                          sit_lc_imagenet)
from vqlc.gen import diffusion_train, gpt_train
from vqlc.gen.networks import dit
from vqlc.gen.networks import gpt as gpt_lib


def _counts(config, codebook_size):
    gpt_train.check_config(config)
    return gpt_lib.param_counts(gpt_train.make_model(config, codebook_size, 256))


def test_gpt_lc_imagenet_is_the_papers_model_and_schedule():
    c = gpt_lc_imagenet.get_config()
    counts = _counts(c, 100_000)
    assert counts["total"] == 509_422_592
    assert counts["total_without_embeddings"] == 405_735_424
    steps_per_epoch = 1_281_167 // 1024
    assert c.optim.warmup_steps == 5 * steps_per_epoch
    assert c.train.num_steps == 100 * steps_per_epoch
    assert c.objective.pkeep == 0.8 and c.eval.sampler.top_k == 10_000
    bf16 = gpt_lc_imagenet.get_config("bf16")
    assert bf16.model.dtype == "bfloat16" and bf16.model.remat == "blocks"


def test_gpt_lc_ffhq_is_unconditional():
    c = gpt_lc_ffhq.get_config()
    model = gpt_train.make_model(c, 100_000, 256)
    assert c.network.num_classes == 0 and model.vocab_size == 100_001  # codes + start token


@pytest.mark.parametrize("size, millions", [("B", 111), ("L", 343), ("XL", 775)])
def test_llamagen_sizes(size, millions):
    c = llamagen_imagenet.get_config(size)
    total = _counts(c, 16_384)["total"]
    assert abs(total / 1e6 - millions) / millions < 0.01, total
    assert c.optim.decay_on == "matrices" and c.optim.grad_clip == 1.0
    assert c.network.class_dropout == 0.1 and c.eval.sampler.cfg_scale == 2.0


@pytest.mark.parametrize("module, objective, sampler", [
    (dit_lc_imagenet, "ddpm", ("ddpm", 250)), (sit_lc_imagenet, "flow", ("dopri5", 0))])
def test_dit_and_sit_lc_are_the_releases_models_and_schedules(module, objective, sampler):
    c = module.get_config()
    diffusion_train.check_config(c)
    model = diffusion_train.make_model(c.network, c.model, (16, 16, 8))  # LC f16 latents
    counts = dit.param_counts(model)
    assert counts["dit_reported"] == 674_963_776 and counts["total"] == 674_890_048
    assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (28, 1152, 16, 2)
    assert model.learn_sigma and model.out_channels == 16 and model.num_classes == 1000
    assert c.objective.kind == objective and c.objective.latent_norm == "none"
    o = c.optim
    assert (o.lr, o.weight_decay, o.warmup_steps, o.schedule, o.ema_decay) == (
        1e-4, 0.0, 0, "constant", 0.9999)
    assert c.train.batch_size == 256 and c.train.num_steps == 400_000
    s = c.eval.sampler
    assert (s.kind, s.num_steps, s.cfg_scale, s.guided_channels) == (*sampler, 8.0, 0)
    assert c.eval.per_class == 50 and c.network.class_dropout == 0.1
    if objective == "flow":
        assert (s.atol, s.rtol) == (1e-6, 1e-3)
        assert (c.objective.interpolant, c.objective.prediction) == ("linear", "velocity")
    bf16 = module.get_config("bf16")
    assert bf16.model.dtype == "bfloat16" and bf16.model.remat == "blocks"
