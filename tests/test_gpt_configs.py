"""The paper-size GPT configs build the models the README and the paper name, with the
schedule arithmetic their docstrings state (shapes only: nothing is allocated)."""
import pytest

from vqlc.configs import gpt_lc_ffhq, gpt_lc_imagenet, llamagen_imagenet
from vqlc.gen import gpt_train
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
