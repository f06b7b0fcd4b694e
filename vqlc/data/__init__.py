"""Input data: image sources (demo photos, folders, tfds) and grain pipelines."""
from vqlc.data.pipeline import make_eval_iterator
from vqlc.data.pipeline import make_eval_source_iterator
from vqlc.data.pipeline import make_source
from vqlc.data.pipeline import make_train_iterator
from vqlc.data.pipeline import num_eval_batches
from vqlc.data.pipeline import num_eval_examples
from vqlc.data.sources import BadDataError
from vqlc.data.sources import DemoPhotos
from vqlc.data.sources import ImageFolder
from vqlc.data.sources import TfdsImages
