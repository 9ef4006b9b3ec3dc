"""2-D key images (PNG; one representative slice per sequence) + report, 64 x 64.

With an empty ``data.manifest`` ``mmvae train`` synthesises a 2-D cohort (PNG key
images cut through the lesion centre, with reports), so this runs out of the box::

    mmvae train --config configs/keyimage2d.py --workdir runs/key2d

PNG files carry no voxel size, so images keep their pixel grid (``spacing=()``) and the
foreground's bounding box is resized to fit 64 x 64 (``data.crop = 'fit'``, aspect ratio
kept): the whole key image reaches the model, not a 64-pixel patch of its centre. ARGS: ``manifest=PATH``, ``cases=N``,
``latent=N``, ``fusion=...``, ``steps=N``, ``text=auto|minilm|scratch`` (the report expert; the
recipe measured on the 3-D quickstart cohort, not on this one; docs/model.md).
"""
from mmvae.config import base_config, parse_arg, use_pretrained_text


def get_config(arg=None):
    args = parse_arg(arg)
    c = base_config()
    c.data.manifest = args.get("manifest", "")
    c.data.image_modalities = ["t1", "t2", "dwi"]
    c.data.spatial_dims = 2
    c.data.shape = (64, 64)
    c.data.spacing = ()
    c.data.crop = "fit"
    c.data.report = True
    c.data.text.max_len = 256
    # The frozen pretrained all-MiniLM-L6-v2 with the sentence-embedding report decoder when the
    # `text` extra is installed, else a BERT from scratch (docs/model.md); text=minilm|scratch.
    use_pretrained_text(c, args.get("text", "auto"))
    c.data.clinical.numeric = ["age"]
    c.data.clinical.categorical = {"sex": ["F", "M"]}
    c.synth.cases = int(args.get("cases", 500))
    c.model.latent_dim = int(args.get("latent", 32))
    c.model.fusion = args.get("fusion", "poe")
    # The retrieval recipe of configs/quickstart.py (docs/results.md).
    c.model.private_dim = 8
    c.model.image.channels = (32, 64, 128)
    c.model.image.patch = 4
    c.model.image.full_res_blocks = True
    c.model.image.decoder_blocks = 0
    c.model.image.full_res_channels = 0
    c.objective.ssl_weight = 5000.0
    c.objective.alignment_weight = 5000.0
    c.objective.subsets = "mvae"
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.train.batch_size = 32
    c.train.steps = int(args.get("steps", 2000))
    c.train.log_every = 20
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    return c
