"""Where scripts written against mmvae's earlier layout find the set-up helpers.

They live in :mod:`mmvae.runs.setup` (a run's spec, objective and optimiser are needed by
retrieval and serving, below the training layer); this module re-exports them unchanged so
that ``from mmvae.train.setup import model_spec, objective_spec, optimizer`` keeps working.
"""
from mmvae.runs.setup import init_state, model_spec, objective_spec, optimizer

__all__ = ["init_state", "model_spec", "objective_spec", "optimizer"]
