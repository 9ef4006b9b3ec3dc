"""Quickstart: the synthetic cohort, a small PoE VAE, CPU-friendly (minutes on 2 cores).

    mmvae train --config configs/quickstart.py --workdir runs/qs
    mmvae train --config configs/quickstart.py:fusion=mopoe,latent=64 --workdir runs/qs-mopoe
"""
from mmvae.config import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg)
    c = base_config()
    c.data.image_modalities = ["t1", "t2", "dwi"]
    c.data.shape = (32, 32, 32)
    c.data.spacing = (2.0, 2.0, 2.0)
    c.data.text.max_len = 64
    c.data.clinical.numeric = ["age"]
    c.data.clinical.categorical = {"sex": ["F", "M"], "smoking": ["no", "yes"]}
    c.synth.cases = int(args.get("cases", 300))
    c.model.latent_dim = int(args.get("latent", 32))
    c.model.fusion = args.get("fusion", "poe")
    c.model.image.channels = (8, 16, 32)
    c.objective.subsets = args.get("subsets", "mvae")
    # Two subsets per case drawn from all non-empty subsets of its modalities (the
    # stochastic subset ELBO): 3.5x cheaper per step than the 7 exact MVAE terms.
    c.objective.num_subset_samples = int(args.get("subset_samples", 2))
    # InfoNCE between the unimodal posteriors of a case (nats; the ELBO here is ~2e5 nats
    # per case, dominated by per-voxel terms). Measured on the default cohort, 200 steps:
    # all-modality mAP@10 0.080 without it, 0.114 with 5000.
    c.objective.alignment_weight = float(args.get("align", 5000.0))
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 30
    c.train.batch_size = 16
    c.train.steps = int(args.get("steps", 200))
    c.train.log_every = 10
    return c
