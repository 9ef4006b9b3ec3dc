"""MedPix-style 2-D key images (MR: T1, T1c, T2, FLAIR, DWI, ADC; CT: ct, ctc PNGs of mixed sizes) + report text.

The manifest comes from scanning a key-image folder (one folder per case with
``<sequence>[_n].png`` and ``report.txt``, and a ``labels.csv`` beside them)::

    mmvae scan ../shared/data/medpix-dev --layout keyimages --out runs/medpix/manifest.jsonl
    mmvae train --config medpix --manifest runs/medpix/manifest.jsonl --workdir runs/medpix

The image experts read frozen ImageNet features of each whole key image
(``model.image.input='features'``, :mod:`mmvae.models.features`; pip install 'mmvae[pretrained]')
and a case is retrieved by its experts' blocks next to the frozen features' blocks
(``retrieval.embedding='experts+features'``): the recipe measured best on the MedPix cohorts
(docs/results.md, docs/model.md). Every sequence and up to 8 key images per sequence are used
(``data.max_series``). Pixels are still preprocessed (each image's foreground box resized to
128 x 128, aspect kept) for ``input=pixels|both``. Retrieval label ``category`` (``location``
is the other label of the shared sample). ARGS: ``manifest=PATH``, ``latent=N``, ``steps=N``,
``label=NAME``, ``text=auto|minilm|scratch`` (the report expert; see docs/model.md),
``sequences=t1+t2+...`` (the image modalities; ``ct+ctc`` for the CT cohort),
``input=features|pixels|both``, ``embedding=experts+features|features|experts|fused``,
``series=N``. No label expert: every case is a query (leave-one-out), so no label may be
seen in training.
"""
from mmvae.config import base_config, parse_arg, use_pretrained_text


def get_config(arg=None):
    args = parse_arg(arg)
    c = base_config()
    c.data.manifest = args.get("manifest", "")
    c.data.image_modalities = [s for s in args.get("sequences", "t1+t1c+t2+flair+dwi+adc").split("+") if s]
    c.data.extra_modalities = "ignore"     # sequences not named in `sequences`
    c.data.spatial_dims = 2
    c.data.shape = (128, 128)
    c.data.spacing = ()
    c.data.crop = "fit"
    c.data.max_series = int(args.get("series", 8))
    c.model.image.input = args.get("input", "features")
    c.retrieval.embedding = args.get("embedding", "experts+features")
    c.data.label = args.get("label", "category")
    c.data.val_fraction = 0.0              # tiny cohort: leave-one-out evaluation over every case
    c.data.text.max_len = 256
    # The frozen pretrained all-MiniLM-L6-v2 with the sentence-embedding report decoder when the
    # `text` extra is installed, else a BERT from scratch (docs/model.md); text=minilm|scratch.
    use_pretrained_text(c, args.get("text", "auto"))
    c.data.clinical.numeric = ["age"]
    c.data.clinical.categorical = {"sex": ["female", "male"]}
    c.synth.cases = 0                      # real data only
    c.model.latent_dim = int(args.get("latent", 32))
    c.model.image.channels = (32, 64, 128)
    c.model.image.patch = 4
    c.model.image.full_res_blocks = True
    c.model.image.decoder_blocks = 0
    c.model.image.full_res_channels = 0
    c.model.image.pooling = "multiscale"
    c.objective.weights = "sqrt"
    # Contrastive terms help pixel experts (quickstart recipe) but, on frozen features, pull 119 cases
    # into memorised pairs: seed 0 on MedPix-dev, images+report location 0.52 with both at 5000 vs
    # 0.68 with neither (docs/model.md). Feature experts train on the ELBO alone.
    pixel_experts = c.model.image.input != "features"
    c.objective.ssl_weight = 5000.0 if pixel_experts else 0.0
    c.objective.alignment_weight = 5000.0 if pixel_experts else 0.0
    c.model.private_dim = 8
    c.objective.num_subset_samples = 2
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 30
    c.train.batch_size = 16
    c.train.steps = int(args.get("steps", 300))
    c.train.log_every = 10
    return c
