"""GPT training batches from an encode workdir: each epoch visits every image once as one of
its copies (both copies of a flipped dataset are used), processes split each global batch,
and a restored iterator continues exactly."""
import numpy as np
import pytest

from tests import tiny_tokenizer
from vqlc import encode_task
from vqlc.configs import encode_demo
from vqlc.gen import token_data

NUM_IMAGES = 12


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    tok_dir = tiny_tokenizer.make_workdir(str(tmp_path_factory.mktemp("tok") / "run"))
    c = encode_demo.get_config("tiny")
    c.update_from_flattened_dict({"tokenizer.workdir": tok_dir, "encode.max_images": NUM_IMAGES,
                                  "encode.images_per_shard": 5, "encode.batch_size": 2,
                                  "encode.what": "codes"})
    workdir = str(tmp_path_factory.mktemp("enc") / "tokens")
    encode_task.run(c, workdir)
    return token_data.ImageCopies(workdir)


def _copy_of(images, codes):
    """(image, copy) of a token map, by lookup."""
    rows = images.rows.column("codes").reshape(len(images), images.copies, -1)
    hits = np.argwhere((rows == codes.reshape(1, 1, -1)).all(-1))
    return tuple(hits[0])


def test_each_epoch_visits_every_image_once_as_a_random_copy(images):
    assert len(images) == NUM_IMAGES and images.copies == 2
    it = token_data.make_token_iterator(images, batch_size=4, seed=0)
    copies_used = set()
    for _ in range(3):  # three epochs of 3 batches
        seen = []
        for _ in range(NUM_IMAGES // 4):
            batch = next(it)
            assert batch["codes"].shape[0] == 4 and batch["codes"].dtype == np.int32
            for codes, label in zip(batch["codes"], batch["label"]):
                image, copy = _copy_of(images, codes)
                assert label == images.rows.column("labels")[image * 2]
                seen.append(image)
                copies_used.add(copy)
        assert sorted(seen) == list(range(NUM_IMAGES))
    assert copies_used == {0, 1}


def test_processes_split_the_global_batch_and_resume_is_exact(images):
    whole = token_data.make_token_iterator(images, batch_size=4, seed=3)
    halves = [token_data.make_token_iterator(images, batch_size=2, seed=3, shard_index=p,
                                             shard_count=2) for p in range(2)]
    for _ in range(4):
        a = next(whole)["codes"]
        b = np.concatenate([next(h)["codes"] for h in halves])
        np.testing.assert_array_equal(np.sort(a.reshape(4, -1), 0), np.sort(b.reshape(4, -1), 0))
    state = whole.get_state()
    expected = [next(whole)["codes"] for _ in range(3)]
    restored = token_data.make_token_iterator(images, batch_size=4, seed=3)
    restored.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(restored)["codes"], e)
