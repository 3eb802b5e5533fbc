#!/usr/bin/python3
"""Write fake moelab run logs that follow the DESIGN.md HDF5 contract (no C++ trainer needed).

    /usr/bin/python3 analysis/make_synthetic_log.py OUT.h5 [--layers 2 --experts 8 --steps 300
        --capacity-factor 1.25 | --drop-fraction 0.05] [--aux-alpha 0.01] [--categories bytes]
    /usr/bin/python3 analysis/make_synthetic_log.py --sweep DIR [--sweep-key router.aux_alpha
        --sweep-values 0,0.001,0.01,0.1] [--seeds 1,2,3,4,5 [--baseline 0.01]] [same knobs]

Importable too: `from make_synthetic_log import write_synthetic_run, write_synthetic_sweep`
(with analysis/ on sys.path); the code lives in moelab_analysis/synthetic.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moelab_analysis._deps import require_or_exit  # noqa: E402  (standard library only)

if __name__ == "__main__":
    require_or_exit(("numpy", "h5py"))

from moelab_analysis.synthetic import (SWEEP_KEYS, write_synthetic_run, write_synthetic_seeded_sweep,  # noqa: E402,F401
                                       write_synthetic_sweep)

__all__ = ["write_synthetic_run", "write_synthetic_sweep", "write_synthetic_seeded_sweep", "main"]


def _value(text):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(prog="make_synthetic_log.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="output .h5 (single run mode)")
    ap.add_argument("--sweep", metavar="DIR", help="write a sweep: one run per value plus sweep.json")
    ap.add_argument("--sweep-key", default="router.aux_alpha", choices=sorted(SWEEP_KEYS))
    ap.add_argument("--sweep-values", default="0,0.001,0.01,0.1", help="comma-separated values")
    ap.add_argument("--index-name", default="sweep.json", help="sweep index file name ('' for none)")
    ap.add_argument("--seeds", default=None, metavar="S1,S2,...",
                    help="a seeded study (moelab train.seeds): every value once per seed, sweep.json with "
                         "each run's grid point and seed")
    ap.add_argument("--baseline", default=None, metavar="VALUE",
                    help="with --seeds: the swept value of the baseline grid point")
    ap.add_argument("--layers", type=int, default=2, help="MoE layers")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--capacity-factor", type=float, default=0.0, help="0 = dropless")
    ap.add_argument("--drop-fraction", type=float, default=None,
                    help="target mean drop fraction (overrides --capacity-factor)")
    ap.add_argument("--aux-alpha", type=float, default=0.01)
    ap.add_argument("--z-loss", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--categories", choices=["bytes", "sources", "none"], default="bytes",
                    help="write category_counts: Brown byte classes, synthetic sources, or none")
    ap.add_argument("--moe-every", type=int, default=1)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--killed", action="store_true", help="leave datasets of unequal length")
    args = ap.parse_args(argv)
    if bool(args.out) == bool(args.sweep):
        ap.error("give exactly one of OUT.h5 or --sweep DIR")
    kw = dict(layers=args.layers, experts=args.experts, top_k=args.top_k, steps=args.steps,
              log_every=args.log_every, eval_every=args.eval_every, batch=args.batch, seq=args.seq,
              capacity_factor=args.capacity_factor, drop_fraction=args.drop_fraction,
              aux_alpha=args.aux_alpha, z_loss=args.z_loss, lr=args.lr, seed=args.seed,
              categories=None if args.categories == "none" else args.categories,
              moe_every=args.moe_every, backend=args.backend, killed=args.killed)
    try:
        if (args.seeds or args.baseline is not None) and not args.sweep:
            ap.error("--seeds and --baseline go with --sweep DIR")
        if args.baseline is not None and not args.seeds:
            ap.error("--baseline needs --seeds")
        if args.sweep and args.seeds:
            values = [_value(v) for v in args.sweep_values.split(",") if v.strip()]
            seeds = [_value(v) for v in args.seeds.split(",") if v.strip()]
            if not seeds or not all(isinstance(s, int) for s in seeds):
                ap.error("--seeds must be comma-separated integers")
            kw.pop(SWEEP_KEYS[args.sweep_key], None)
            kw.pop("seed", None)
            paths = write_synthetic_seeded_sweep(args.sweep, key=args.sweep_key, values=values, seeds=seeds,
                                                 baseline=None if args.baseline is None else _value(args.baseline),
                                                 **kw)
        elif args.sweep:
            values = [_value(v) for v in args.sweep_values.split(",") if v.strip()]
            kw.pop(SWEEP_KEYS[args.sweep_key], None)
            paths = write_synthetic_sweep(args.sweep, key=args.sweep_key, values=values,
                                          index_name=args.index_name or None, **kw)
        else:
            paths = [write_synthetic_run(args.out, **kw)]
    except ValueError as exc:
        ap.error(str(exc))
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
