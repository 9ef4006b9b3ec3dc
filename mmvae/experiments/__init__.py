"""Experiment building blocks: the shared evaluation protocol, baselines, the ablation
grid and figures. The scripts in ``experiments/`` are thin command lines over these."""
