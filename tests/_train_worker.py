"""Helper of tests/test_train.py: one training in a fresh process.

    python tests/_train_worker.py [--devices N] [--num-processes P --process-id I --port PORT]
        [--dump OUT.npz] [--slow-after K --slow-seconds S] -- ARGV...

``ARGV`` is an ``mmvae`` command line (``train --config ... --workdir ...``). The
device count (``--xla_force_host_platform_device_count``) must be fixed before JAX is
imported, hence a process per layout. With ``--num-processes`` the run joins a
``jax.distributed`` job on 127.0.0.1:PORT (CPU collectives: gloo). ``--dump`` writes
the initial and final parameters (and EMA), gathered, plus the step, the process index
and the digest of the local copy. ``--slow-after K`` sleeps S seconds before every batch after
the K-th (so a test can kill the process mid-run); ``--poison-after K`` fills the
images of every batch after the K-th with 3e38 (finite, but the loss overflows).
"""
import argparse
import os
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--dump")
    ap.add_argument("--slow-after", type=int, default=-1)
    ap.add_argument("--slow-seconds", type=float, default=0.0)
    ap.add_argument("--poison-after", type=int, default=-1)
    args, argv = ap.parse_known_args()
    if argv and argv[0] == "--":
        argv = argv[1:]
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={args.devices}")
    os.environ["XLA_FLAGS"] = " ".join(flags)

    import jax
    jax.config.update("jax_platforms", "cpu")
    if args.num_processes > 1:
        argv += [f"--config.distributed.coordinator_address=127.0.0.1:{args.port}",
                 f"--config.distributed.num_processes={args.num_processes}",
                 f"--config.distributed.process_id={args.process_id}",
                 "--config.distributed.initialize=yes"]

    from mmvae.train import loop
    if args.slow_after >= 0:
        import time
        orig = loop.train_batch_stream

        def slow(*a, **k):
            for i, item in enumerate(orig(*a, **k)):
                if i >= args.slow_after:
                    time.sleep(args.slow_seconds)
                yield item

        loop.train_batch_stream = slow

    if args.poison_after >= 0:
        orig_stream = loop.train_batch_stream

        def poisoned(*a, **k):
            for i, (batch, pos) in enumerate(orig_stream(*a, **k)):
                if i >= args.poison_after:   # finite but overflowing: the loss becomes inf/NaN
                    batch = {n: (x * 0 + 3e38 if n.startswith("image/") else x) for n, x in batch.items()}
                yield batch, pos

        loop.train_batch_stream = poisoned

    final = {}
    if args.dump:
        orig_init = loop.initial_state

        def init_and_keep(*a, **k):
            state = orig_init(*a, **k)
            final["init"] = loop.gather(state["params"])
            return state

        loop.initial_state = init_and_keep
        orig_train = loop.train_and_evaluate

        def train_and_keep(*a, **k):
            s = orig_train(*a, **dict(k, return_state=True))
            final["state"] = s.pop("state")
            return s

        loop.train_and_evaluate = train_and_keep

    from mmvae.cli import main as cli_main
    rc = cli_main(argv)
    if rc == 0 and args.dump:
        import numpy as np
        from mmvae.runs.checkpoint import digest
        state = final["state"]
        host = loop.gather({k: state[k] for k in ("params", "ema") if k in state})
        if "init" in final:   # not when the run resumed
            host["init"] = final["init"]
        flat = {"/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path): np.asarray(v)
                for path, v in jax.tree_util.tree_leaves_with_path(host)}
        flat["__step__"] = np.asarray(int(jax.device_get(state["step"])))
        flat["__process__"] = np.asarray(jax.process_index())
        flat["__digest__"] = np.asarray(digest({k: host[k] for k in ("params", "ema") if k in host}))
        np.savez(args.dump, **flat)
    sys.exit(rc)


if __name__ == "__main__":
    main()
