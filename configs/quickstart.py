"""Quickstart: the synthetic cohort, a small PoE VAE, CPU-friendly (minutes on 2 cores).

    mmvae train --config configs/quickstart.py --workdir runs/qs
    mmvae train --config configs/quickstart.py:fusion=mopoe,latent=64 --workdir runs/qs-mopoe
    mmvae train --config configs/quickstart.py:label_fraction=0.2 --workdir runs/qs-semi
    mmvae train --config configs/quickstart.py:text=scratch --workdir runs/qs-scratch-text

The recipe is the one that retrieved best on this cohort (docs/results.md, diagnostics in
experiments/diagnose_latent.py), each step measured at 200 steps, all-modality mAP@10 on
held-out queries, seed 0:

* the original (flatten + dense head, ``dimension`` weights, cross-modal InfoNCE): 0.127;
* multiscale max/mean pooling + ``sqrt`` weights + SimCLR within modality (``ssl``): 0.141
  with the (8, 16, 32) encoder, 0.175 with the fast blocks below (4³ patch stem, residual
  blocks at every stage, an unpatchify decoder head); without the cross-modal InfoNCE 0.094;
* + private latent blocks (8 per modality): 0.225;
* with labels on all training cases (label expert + SupCon, ``label_fraction=1``): 0.618;
* (300 steps) the report expert from the pretrained all-MiniLM-L6-v2, frozen, 256 tokens, with
  the report likelihood on its sentence embedding, instead of a BERT from scratch on 64 tokens
  with the bag-of-words decoder: 0.230 -> 0.372 (seed 1: 0.218 -> 0.257), report-only queries
  0.147 -> 0.217 (0.141 -> 0.230; MiniLM's own embedding 0.202); used when the ``text`` extra
  is installed (``text=auto``).
"""
from mmvae.config import base_config, parse_arg, use_pretrained_text


def get_config(arg=None):
    args = parse_arg(arg)
    c = base_config()
    c.data.image_modalities = ["t1", "t2", "dwi"]
    c.data.shape = (32, 32, 32)
    c.data.spacing = (2.0, 2.0, 2.0)
    # Report expert: the pretrained all-MiniLM-L6-v2, frozen, on 256 WordPiece tokens, with the
    # report likelihood on its sentence embedding, when the `text` extra is installed; otherwise a
    # small BERT from scratch on 64 tokens with the bag-of-words decoder. text=minilm|scratch
    # forces one. Measurements: docs/model.md ("Encoders and decoders").
    c.data.text.max_len = 64
    use_pretrained_text(c, args.get("text", "auto"))
    c.data.clinical.numeric = ["age"]
    c.data.clinical.categorical = {"sex": ["F", "M"], "smoking": ["no", "yes"]}
    c.data.label_fraction = float(args.get("label_fraction", 0.0))
    c.synth.cases = int(args.get("cases", 300))
    c.model.latent_dim = int(args.get("latent", 32))
    # Private blocks help unsupervised retrieval, not the label expert (docs/results.md).
    c.model.private_dim = int(args.get("private", 8 if c.data.label_fraction == 0 else 0))
    c.model.fusion = args.get("fusion", "poe")
    # Fast blocks: a 4³ patch stem, residual blocks at both stages, no decoder convolutions,
    # an unpatchify head; multiscale max/mean pooling (the base default).
    c.model.image.channels = (32, 64)
    c.model.image.patch = 4
    c.model.image.full_res_blocks = True
    c.model.image.decoder_blocks = 0
    c.model.image.full_res_channels = 0
    c.objective.subsets = args.get("subsets", "mvae")
    # Two subsets per case drawn from all non-empty subsets of its modalities (the
    # stochastic subset ELBO): 3.5x cheaper per step than the 7 exact MVAE terms.
    c.objective.num_subset_samples = int(args.get("subset_samples", 2))
    # InfoNCE between the unimodal posteriors of a case (nats; the ELBO here is ~1e5 nats
    # per case, dominated by per-voxel terms): without it single-modality queries fall to
    # chance (measured: 0.05-0.06 per modality).
    c.objective.alignment_weight = float(args.get("align", 5000.0))
    c.objective.ssl_weight = float(args.get("ssl", 5000.0))
    if c.data.label_fraction > 0:
        c.objective.supcon_weight = float(args.get("supcon", 5000.0))
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 30
    c.train.batch_size = 16
    c.train.steps = int(args.get("steps", 300))
    c.train.log_every = 10
    return c
