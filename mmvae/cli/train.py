"""``mmvae train``: train a model (synthesising the config's cohort when it has no manifest)."""
from __future__ import annotations

import json
from pathlib import Path

from mmvae.cli import _config


def add(sub) -> None:
    s = sub.add_parser("train", help="train a model; --config.a.b=value overrides any config field")
    s.add_argument("--config", help=_config.CONFIG_HELP)
    s.add_argument("--workdir", required=True)
    s.add_argument("--manifest", help="cohort manifest (overrides data.manifest)")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--on-error", choices=["raise", "skip"], help=_config.ON_ERROR_HELP)
    s.set_defaults(fn=run)


def run(a, extra):
    from mmvae.train.loop import train_and_evaluate
    config = _config.on_error(_config.load(a.config, extra), a)
    if a.manifest:
        with config.unlocked():
            config.data.manifest = a.manifest
    if not config.data.manifest:
        from mmvae.errors import ConfigError
        if int(config.synth.cases) <= 0:
            raise ConfigError("data.manifest is empty: pass --manifest (this config has no synthetic cohort)")
        from mmvae.quickstart import synthesize
        with config.unlocked():
            config.data.manifest = str(synthesize(config, Path(a.workdir) / "data"))
    s = train_and_evaluate(config, a.workdir, show_progress=not a.quiet)
    print(json.dumps({k: v for k, v in s.items() if k != "metrics"}))
