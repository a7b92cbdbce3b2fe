"""``pyrobnn fit CONFIG --out DIR``: train a BNN from a TOML config into a run directory."""
import json

from ._common import add_run_parser, prepare, report_interrupt

EPILOG = """\
examples:
  pyrobnn fit run.toml --out runs/digits                 # a new run (DIR empty or absent)
  pyrobnn fit run.toml --out runs/digits --resume        # continue it (after Ctrl-C, a crash, more epochs)
  pyrobnn fit run.toml --out runs/digits --overwrite     # replace it
  pyrobnn report runs/digits                             # plots + HTML from runs/digits/inference_data.nc

writes into DIR: run.json (config, fingerprint, version), checkpoints/, history.csv, metrics.json,
model.safetensors, inference_data.nc (guide draws on held-out data), learning_curves.png, reliability.png.
Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and prints the --resume command
(exit 130 / 143). With bnn.guide = "hyper-mean-field" and [train] lambdas = [lo, hi] one guide is trained
for every KL weight in [lo, hi]; metrics.json then holds the accuracy/sparsity curve over lambda.
"""


def register(sub):
    add_run_parser(sub, "fit", help="train a BNN (SVI) from a TOML config into a run directory",
                   description="Train a BNN by SVI from a TOML config.", epilog=EPILOG,
                   what="checkpoints/, metrics.json, history.csv, model.safetensors, inference_data.nc, plots",
                   func=run)


def run(args):
    from pyrobnn.inference.fit import TrainingInterrupted
    from pyrobnn.cli.run import interrupt_guard, run_fit
    cfg, rundir = prepare("fit", args)
    with interrupt_guard() as stop:
        try:
            resume = rundir.resuming if rundir is not None else args.resume or args.resume_or_start
            metrics = run_fit(cfg, args.out, resume=resume, progress=not args.no_progress, run=rundir,
                              stop_requested=stop)
        except TrainingInterrupted as e:
            detail = f"stopped after epoch {e.epoch + 1}, step {e.step}; checkpoint {e.checkpoint}" if e.step \
                else f"stopped after epoch {e.epoch}; checkpoint {e.checkpoint}"
            return report_interrupt("fit", stop, args, detail, saved=e.checkpoint is not None)
    if metrics is not None:  # None on the non-zero ranks of a torchrun job
        print(json.dumps({"test": metrics}, indent=2))
    return 0
