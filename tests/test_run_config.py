"""A run's saved config.json is read merged onto the base config (mmvae.runs.files.merge_run_config)."""
from __future__ import annotations

import copy
import json

from mmvae.config import base_config
from mmvae.models.mvae import ModelSpec
from mmvae.runs.files import LEGACY_DEFAULTS, merge_run_config, read_run_files, spec_to_dict


def _drop(d: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d[p]
    del d[leaf]


def test_a_current_run_config_reads_back_unchanged():
    base = base_config().to_dict()
    assert merge_run_config(copy.deepcopy(base)).to_dict() == base


def test_keys_an_old_run_lacks_get_the_base_default_or_the_legacy_one():
    saved = base_config().to_dict()
    for key in ("retrieval.embedding", "model.image.pooling", "retrieval.standardize", "data.dwi_b_value",
                "data.max_voxels", "serve"):
        _drop(saved, key)
    saved["data"]["shape"] = [16, 16, 16]          # saved values win (as JSON gives them)
    c = merge_run_config(saved)
    assert c.retrieval.embedding == "fused"          # runs before the key retrieved on the fused mean
    assert c.model.image.pooling == "flatten"
    assert c.retrieval.standardize is True and c.data.dwi_b_value == "highest"
    assert c.data.max_voxels == base_config().data.max_voxels and c.serve.k == base_config().serve.k
    assert list(c.data.shape) == [16, 16, 16]
    # a saved run that has the key keeps its value, whatever the legacy default
    saved = base_config().to_dict()
    assert merge_run_config(saved).retrieval.embedding == base_config().retrieval.embedding
    # every legacy entry names a field of the base config
    base = base_config()
    for key in LEGACY_DEFAULTS:
        node = base
        for p in key.split("."):
            node = node[p]


def test_free_form_groups_are_taken_whole_and_unknown_saved_keys_kept():
    saved = base_config().to_dict()
    saved["evals"] = {}                              # the run switched its evaluators off
    saved["data"]["other_modalities"] = {"lab": {"kind": "vector", "size": 3}}
    saved["data"]["clinical"] = {"numeric": ["age"], "categorical": {"sex": ["F", "M"]}}
    saved["retired"] = {"x": 1}
    c = merge_run_config(saved)
    assert dict(c.evals) == {} and list(c.data.other_modalities) == ["lab"]
    assert dict(c.data.clinical.categorical) == {"sex": ["F", "M"]} and c.retired.x == 1


def test_read_run_files_merges(tmp_path):
    saved = base_config().to_dict()
    _drop(saved, "retrieval.embedding")
    _drop(saved, "data.features")
    (tmp_path / "config.json").write_text(json.dumps(saved, default=list))
    spec = ModelSpec(image_modalities=("t1",), shape=(8, 8, 8), latent_dim=4, report=False)
    (tmp_path / "model_spec.json").write_text(json.dumps(spec_to_dict(spec)))
    (tmp_path / "clinical_stats.json").write_text("{}")
    config, got, _ = read_run_files(tmp_path)
    assert got == spec
    assert config.retrieval.embedding == "fused" and config.data.features.slices == base_config().data.features.slices
