"""Prostate MRI (bpMRI): axial T2, DWI (high b-value), ADC + the radiology report.

Manifest: e.g. from a DICOM study folder per case (``mmvae.data.scan.scan_folder(root,
layout='dicom')`` maps ``t2_tse_tra`` → t2, ``..._CALC_BVAL`` → dwi, ``..._ADC`` → adc)
with report rows (``modality=report``, ``text`` or a ``path`` to a .txt) and labels added
per case (default label ``clinsig``: clinically significant cancer yes/no).

DWI and ADC are resampled onto the T2 grid first (``reference_modality``), then to
1.5 x 1.5 x 3 mm and cropped/padded to 64 x 64 x 16 (96 x 96 x 48 mm) around the centre
of the field of view (no skull stripping, so no foreground crop).
ARGS: ``manifest=PATH``, ``label=NAME``, ``latent=N``, ``fusion=...``, ``steps=N``, ``batch=N``.
"""
from mmvae.config import base_config, parse_arg


def get_config(arg=None):
    args = parse_arg(arg)
    c = base_config()
    c.data.manifest = args.get("manifest", "")
    c.data.image_modalities = ["t2", "dwi", "adc"]
    c.data.report = True
    c.data.shape = (64, 64, 16)
    c.data.spacing = (1.5, 1.5, 3.0)
    c.data.crop = "center"
    c.data.reference_modality = "t2"
    c.data.label = args.get("label", "clinsig")
    c.data.extra_modalities = "ignore"     # sagittal/coronal T2, PD... rows of a scanned study
    c.data.text.max_len = 128
    c.synth.cases = 0                      # real data only: no synthetic fallback
    c.model.latent_dim = int(args.get("latent", 32))
    c.model.fusion = args.get("fusion", "poe")
    c.model.image.channels = (16, 32, 64)
    c.objective.subsets = "mvae"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.train.batch_size = int(args.get("batch", 16))
    c.train.steps = int(args.get("steps", 3000))
    c.train.log_every = 20
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    return c
