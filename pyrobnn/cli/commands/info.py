"""``pyrobnn info FILE``: print the spec of a saved model or checkpoint (reads JSON only; no pickle)."""
import json

from ._common import add_parser


def register(sub):
    p = add_parser(sub, "info", help="show what a pyrobnn .safetensors file holds",
                   description="Print the JSON spec and tensor shapes of a pyrobnn file (model, checkpoint, "
                               "posterior, student); reads JSON and tensors only, never unpickles.",
                   epilog="examples:\n  pyrobnn info runs/digits/model.safetensors\n"
                          "  pyrobnn info runs/digits/checkpoints/ckpt-e00002-s0000000.safetensors | head")
    p.add_argument("file", help="a .safetensors file written by pyrobnn")
    p.set_defaults(func=run)


def run(args):
    from pyrobnn.io import read_state
    tensors, meta = read_state(args.file)
    summary = {k: v for k, v in meta.items() if k not in ("state", "history")}
    summary["tensors"] = {k: list(v.shape) for k, v in sorted(tensors.items())[:50]}
    print(json.dumps(summary, indent=2, default=str))
    return 0
