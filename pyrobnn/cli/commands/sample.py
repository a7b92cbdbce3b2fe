"""``pyrobnn sample CONFIG --out DIR``: SGLD / pSGLD chains from a TOML config into a run directory."""
import json

from ._common import add_run_parser, prepare, report_interrupt

EPILOG = """\
examples:
  pyrobnn sample sgld.toml --out runs/digits-sgld            # chains as set in [sample]
  pyrobnn sample sgld.toml --out runs/digits-sgld --resume   # finish the chains not yet written
  pyrobnn report runs/digits-sgld                            # trace, function-space R-hat/ESS, reliability

the config's [sample] table (the [train] table is not used):
  kernel = "psgld"; step_size = 1e-4 (or {schedule = "polynomial", a = 1e-4, gamma = 0.55},
  {schedule = "cyclical", step_size = 1e-4, num_steps = 3000, num_cycles = 3});
  num_samples = 100 (draws kept per chain); warmup_steps = 1000; thin = 10; num_chains = 4; batch_size = 128;
  temperature = 1.0

writes into DIR: run.json, chains/chain-NNN.safetensors (one per finished chain; --resume skips them),
posterior.safetensors (all chains: pyrobnn.inference.SamplePosterior.load), metrics.json (test metrics
of the ensemble) and inference_data.nc. Ctrl-C keeps the finished chains and prints the --resume command.
"""


def register(sub):
    add_run_parser(sub, "sample", help="SGLD / pSGLD posterior chains from a TOML config into a run directory",
                   description="Sample a BNN's posterior with SGLD or pSGLD.", epilog=EPILOG,
                   what="chains/, posterior.safetensors, metrics.json, inference_data.nc", func=run)


def run(args):
    from pyrobnn.cli.run import SampleInterrupted, interrupt_guard, run_sample
    cfg, rundir = prepare("sample", args)
    if rundir is None:
        raise ValueError("pyrobnn sample runs in one process; for chains on several processes use "
                         "pyrobnn.inference.sample_chains under torchrun")
    with interrupt_guard(immediate=True) as stop:
        try:
            metrics = run_sample(cfg, args.out, resume=rundir.resuming, progress=not args.no_progress, run=rundir,
                                 stop_requested=stop)
        except SampleInterrupted as e:
            return report_interrupt("sample", stop, args, str(e), saved=e.chain > 0 or rundir.has_checkpoint())
    print(json.dumps({"test": metrics}, indent=2))
    return 0
