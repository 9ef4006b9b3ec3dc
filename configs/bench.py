"""Performance reference: 3 imaging modalities at 1 x 64³ + a 128-token report,
latent 64, batch 16, PoE, the all-subset ELBO (15 subset terms per case).

Runs on the synthetic cohort (generated into ``<workdir>/data`` on first use)::

    mmvae train --config configs/bench.py --workdir runs/bench
    mmvae train --config configs/bench.py:dtype=bfloat16,steps=300 --workdir runs/bench-bf16

Cases/s and step time are in ``<workdir>/metrics.jsonl`` (``cases_per_s``,
``step_time_s``; the first logged window excludes compilation, see
``compile_seconds`` in the printed summary). ARGS: ``steps=N``, ``batch=N``,
``dtype=float32|bfloat16``, ``fsdp=0|1``, ``cases=N``, ``decode_chunks=N``,
``conv=auto|xla|depth2d`` (how the 3³ convs are computed; auto = depth2d on CPU).
"""
from mmvae.config import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg)
    c = base_config()
    c.data.image_modalities = ["t1", "t2", "dwi"]
    c.data.max_series = 1
    c.data.shape = (64, 64, 64)
    c.data.spacing = (2.0, 2.0, 2.0)
    c.data.report = True
    c.data.text.max_len = 128
    c.data.clinical.numeric = []
    c.data.clinical.categorical = {}
    c.data.prefetch = 4
    c.data.workers = 4
    c.synth.cases = int(args.get("cases", 256))
    c.model.latent_dim = 64
    c.model.fusion = "poe"
    c.model.dtype = args.get("dtype", "float32")
    # The fast blocks for XLA CPU: a 4³ patch stem (64³ → 16³) so every 3³ conv runs on ≥ 64
    # channels (~47-110 GFLOP/s here, vs ~13 for 16 channels at 32³); residual blocks in the
    # encoder only; an unpatchify decoder head (no full-resolution feature maps: 15 subset
    # decodes × 3 sequences per case made those the bulk of time and memory).
    c.model.image.channels = (64, 128, 256)
    c.model.image.patch = 4
    c.model.image.full_res_blocks = True
    c.model.image.decoder_blocks = 0
    c.model.image.full_res_channels = 0
    c.model.image.pooling = "flatten"      # the network the PyTorch side of ../shared/peers ports
    c.model.image.conv = args.get("conv", "auto")
    c.model.text.hidden = 128
    c.model.text.layers = 2
    c.model.text.heads = 4
    c.model.text.intermediate = 256
    c.objective.subsets = "all"
    c.objective.num_subset_samples = 0
    # Decode the 15 subset terms one chunk at a time (each chunk's value and gradient in one pass,
    # objectives/elbo.py: fused_subset_reconstruction): peak memory 7.8 → 3.9 GB and,
    # measured, faster (one pass 18.1 s/step → 5 chunks 15.2 on a 2-core EPYC; on a 2-core
    # Xeon 5 chunks 12.9 → 15 chunks 10.6-10.9: the chunk's working set stays in cache).
    c.objective.decode_chunks = int(args.get("decode_chunks", 15))
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.train.batch_size = int(args.get("batch", 16))
    c.train.steps = int(args.get("steps", 300))
    c.train.log_every = 10
    c.train.fsdp = args.get("fsdp", "0") in ("1", "true", "True")
    return c
