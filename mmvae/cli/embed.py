"""``mmvae embed``: encode every case of a manifest with a trained model.

``--out FILE.npz``: one embeddings file, one process. ``--out FOLDER``: a shard set
(:mod:`mmvae.retrieval.shards`), written by one process or by the N processes of a
``jax.distributed`` job, kill-safe and resumable; every reader of embeddings reads either.
"""
from __future__ import annotations

from mmvae.cli import _config


def add(sub) -> None:
    s = sub.add_parser("embed", help="encode every case of a manifest with a trained model",
                       description="Encode every case of a manifest. --out FILE.npz writes one file; --out FOLDER "
                                   "writes a shard set, which N processes (jax.distributed; the flags below or "
                                   "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, SLURM, Open MPI) "
                                   "share, and which a re-run completes after a kill (docs/scale.md).")
    s.add_argument("--workdir", required=True, help="trained work dir")
    s.add_argument("--manifest", help="cases to encode (default: the run's data.manifest)")
    s.add_argument("--out", required=True, help="embeddings file (.npz) or shard-set folder")
    s.add_argument("--on-error", choices=["raise", "skip"], help=_config.ON_ERROR_HELP)
    s.add_argument("--batch-size", type=int, default=32, help="cases per encoder call (default 32)")
    s.add_argument("--shard-size", type=int, default=None,
                   help="cases per shard of a shard set, a multiple of --batch-size (default 4096)")
    s.add_argument("--coordinator-address", default="", help="host:port of process 0 of a jax.distributed job")
    s.add_argument("--num-processes", type=int, default=0, help="processes of the job (0: from the environment)")
    s.add_argument("--process-id", type=int, default=-1, help="this process's index (-1: from the environment)")
    s.set_defaults(fn=run)


def run(a, extra):
    from mmvae.errors import InputError
    if a.batch_size < 1:
        raise InputError(f"--batch-size must be ≥ 1 (got {a.batch_size})")
    if a.shard_size is not None and a.shard_size < 1:
        raise InputError(f"--shard-size must be ≥ 1 (got {a.shard_size})")
    if a.process_id >= 0 and a.num_processes < 1 and not a.coordinator_address:
        raise InputError("--process-id needs --num-processes (and --coordinator-address): the job's size")
    sharded = not str(a.out).endswith(".npz")
    if not sharded and (a.shard_size is not None or a.num_processes > 1 or a.coordinator_address):
        raise InputError("a .npz is written by one process: give --out a folder to write a shard set "
                         "(--shard-size, several processes)")
    if not sharded:
        from mmvae.retrieval.pipeline import embed_run
        done = embed_run(a.workdir, a.manifest, on_error=a.on_error, out=a.out, batch_size=a.batch_size)
        skipped = done.cohort.skipped
        print(f"embedded {len(done.embeddings.case_ids)} cases -> {a.out}"
              + (f" ({len(skipped)} skipped)" if skipped else ""))
        return
    import ml_collections

    from mmvae.retrieval.shards import DEFAULT_SHARD_SIZE, embed_shards
    from mmvae.sharding import maybe_initialize_distributed
    maybe_initialize_distributed(ml_collections.ConfigDict({"distributed": dict(
        initialize="auto", coordinator_address=a.coordinator_address, num_processes=a.num_processes,
        process_id=a.process_id)}))
    r = embed_shards(a.workdir, a.manifest, a.out, shard_size=DEFAULT_SHARD_SIZE if a.shard_size is None else a.shard_size,
                     batch_size=a.batch_size, on_error=a.on_error)
    import jax
    who = f"process {jax.process_index()}/{jax.process_count()}: " if jax.process_count() > 1 else ""
    state = ("shard set complete" if r.complete else
             "process 0 completes the shard set" if jax.process_count() > 1 else
             "shards of other processes missing: run them (or this command without --process-id) to complete it")
    print(f"{who}encoded {len(r.encoded)} shard(s), {len(r.reused)} already there, in {r.seconds:.1f} s; "
          f"{r.n_cases} cases in the plan; {state} -> {a.out}")
