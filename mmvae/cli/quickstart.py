"""``mmvae quickstart``: synth → train → embed → index → evaluate (:mod:`mmvae.quickstart`)."""
from __future__ import annotations

from mmvae.cli import _config


def add(sub) -> None:
    s = sub.add_parser("quickstart", help="synth → train → embed → index → evaluate, offline, on CPU")
    s.add_argument("--workdir", default="runs/quickstart")
    s.add_argument("--config", help=_config.CONFIG_HELP)
    s.add_argument("--cases", type=int)
    s.add_argument("--steps", type=int)
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--on-error", choices=["raise", "skip"], help=_config.ON_ERROR_HELP)
    s.set_defaults(fn=run)


def run(a, extra):
    from mmvae.quickstart import run_quickstart
    config = _config.on_error(_config.load(a.config, extra), a)
    with config.unlocked():
        if a.cases:
            config.synth.cases = a.cases
        if a.steps:
            config.train.steps = a.steps
    run_quickstart(config, a.workdir, show_progress=not a.quiet)
