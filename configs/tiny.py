"""Tiny config for tests: 16³ volumes, a few steps, a 2-layer 32-wide BERT."""
from mmvae.config import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg)
    c = base_config()
    c.data.image_modalities = ["t1", "t2", "dwi"]
    c.data.shape = (16, 16, 16)
    c.data.spacing = (4.0, 4.0, 4.0)
    c.data.text.max_len = 32
    c.data.workers = 1
    c.data.clinical.numeric = ["age"]
    c.data.clinical.categorical = {"sex": ["F", "M"]}
    c.synth.cases = int(args.get("cases", 40))
    c.model.latent_dim = int(args.get("latent", 8))
    c.model.fusion = args.get("fusion", "poe")
    c.model.image.channels = (8, 16)
    c.model.text.hidden = 32
    c.model.text.heads = 2
    c.model.text.layers = 1
    c.model.text.intermediate = 64
    c.model.report_decoder.hidden = 32
    c.model.clinical.hidden = 16
    c.objective.subsets = args.get("subsets", "mvae")
    c.optim.warmup_steps = 2
    c.train.batch_size = 8
    c.train.steps = int(args.get("steps", 6))
    c.train.log_every = 2
    return c
