"""``pyrobnn info FILE``: print the spec of a saved model or checkpoint (reads JSON only; no pickle)."""
import json


def register(sub):
    p = sub.add_parser("info", help="show what a pyrobnn .safetensors file holds")
    p.add_argument("file")
    p.set_defaults(func=run)


def run(args):
    from pyrobnn.io import read_state
    tensors, meta = read_state(args.file)
    summary = {k: v for k, v in meta.items() if k not in ("state", "history")}
    summary["tensors"] = {k: list(v.shape) for k, v in sorted(tensors.items())[:50]}
    print(json.dumps(summary, indent=2, default=str))
    return 0
