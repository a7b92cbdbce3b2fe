"""``pyrobnn dwp train --source fashion-mnist --k 4 --epochs 2 --out dwp.safetensors``: make a deep weight prior."""
import json


def register(sub):
    import argparse
    p = sub.add_parser("dwp", help="deep weight prior: train the kernel VAEs from source networks",
                       epilog="example:\n  pyrobnn dwp train --source fashion-mnist --k 4 --epochs 2 --out dwp.safetensors\n"
                              "then use it as a prior: [bnn] prior = {name = \"deep-weight\", path = \"dwp.safetensors\"}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="dwp_command", metavar="ACTION")
    t = dsub.add_parser("train", help="train K source convnets, collect their kernels, fit one VAE per conv layer")
    t.add_argument("--source", default="fashion-mnist", help="source dataset: fashion-mnist (default) or mnist5k")
    t.add_argument("--k", type=int, default=4, help="number of source networks K (default 4)")
    t.add_argument("--epochs", type=int, default=2, help="training epochs of each source network (default 2)")
    t.add_argument("--limit-train", type=int, default=None, help="use only the first N source training images")
    t.add_argument("--arch", type=_arch, default="fconv",
                   help='source architecture from the model zoo: a name (default fconv) or a JSON spec, '
                        'e.g. \'{"name": "fconv", "channels": [16, 32]}\'')
    t.add_argument("--latent", type=_latent, default=4,
                   help="VAE latent dimension: one int (default 4) or per layer, e.g. conv1=2,conv2=4")
    t.add_argument("--hidden", type=int, default=16, help="VAE conv channels (default 16)")
    t.add_argument("--vae-epochs", type=int, default=100, help="VAE training epochs (default 100)")
    t.add_argument("--vae-min-steps", type=int, default=2000,
                   help="at least this many VAE optimiser steps per layer (small kernel sets get more epochs)")
    t.add_argument("--min-norm-fraction", type=float, default=0.05,
                   help="drop kernels whose norm is below this fraction of the layer's median (default 0.05)")
    t.add_argument("--augment", default="none", choices=("none", "sign", "dihedral", "dihedral+sign"),
                   help="symmetry augmentation of the VAEs' training kernels (rotations/transposes, sign flips)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="L2 coefficient of the source nets' Adam")
    t.add_argument("--normalize", action="store_true",
                   help="fit the VAEs to kernel shapes w/|w| (the prior is then shape VAE × N(0, scale²); see "
                        "DeepWeightPrior's scale)")
    t.add_argument("--seed", type=int, default=0, help="seeds the source networks and the VAEs (default 0)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--out", required=True, help="output .safetensors file")
    t.add_argument("--quiet", action="store_true", help="no progress lines")
    t.set_defaults(func=run_train)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _arch(text):
    if text.lstrip().startswith("{"):
        spec = json.loads(text)
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"--arch JSON must be an object with a 'name', got {text!r}")
        return spec
    return text


def _latent(text):
    if "=" not in text:
        return int(text)
    out = {}
    for part in text.split(","):
        layer, _, value = part.partition("=")
        out[layer.strip()] = int(value)
    return out


def run_train(args):
    import torch
    from pyrobnn.priors.deep_weight.pipeline import train_deep_weight_prior
    if args.threads:
        torch.set_num_threads(args.threads)
    prior = train_deep_weight_prior(
        args.out, source=args.source, num_nets=args.k, epochs=args.epochs, limit_train=args.limit_train,
        arch=args.arch, latent_dim=args.latent, hidden=args.hidden, vae_epochs=args.vae_epochs,
        min_norm_fraction=args.min_norm_fraction, seed=args.seed, vae_min_steps=args.vae_min_steps,
        weight_decay=args.weight_decay, augment=args.augment, normalize=args.normalize, log=None if args.quiet else print)
    summary = {"out": args.out, "vaes": {n: v.config() for n, v in prior.vaes.items()},
               "kernels": prior.provenance["kernels"],
               "bound_heldout": {n: r["bound_heldout"] for n, r in prior.provenance["vae"].items()},
               "source_test_accuracy": [r.get("test_accuracy") for r in prior.provenance["source_nets"]]}
    print(json.dumps(summary, indent=2))
    return 0
