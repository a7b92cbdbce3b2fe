"""``pyrobnn fit run.toml --out DIR [--resume]``."""
import json


def register(sub):
    p = sub.add_parser("fit", help="train a BNN from a TOML config")
    p.add_argument("config", help="TOML run config (see pyrobnn.config)")
    p.add_argument("--out", required=True, help="output directory (metrics.json, history.csv, model, plots)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args):
    from pyrobnn.config import load_config
    from pyrobnn.run import run_fit
    cfg = load_config(args.config)
    metrics = run_fit(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    if metrics is not None:  # None on the non-zero ranks of a torchrun job
        print(json.dumps({"test": metrics}, indent=2))
    return 0
