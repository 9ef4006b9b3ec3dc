"""``mmvae synth``: write a synthetic cohort."""
from __future__ import annotations


def add(sub) -> None:
    s = sub.add_parser("synth", help="write a synthetic cohort (NIfTI + reports + manifest)")
    s.add_argument("--out", required=True)
    s.add_argument("--cases", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shape", type=int, nargs="+", default=[32, 32, 32])
    s.add_argument("--spacing", type=float, nargs="+", default=[2.0, 2.0, 2.0])
    s.set_defaults(fn=run)


def run(a, extra):
    from mmvae.data.synth import make_cohort
    path = make_cohort(a.out, a.cases, seed=a.seed, shape=tuple(a.shape), spacing=tuple(a.spacing),
                       spatial_dims=len(a.shape))
    print(f"wrote {a.cases} cases; manifest {path}")
