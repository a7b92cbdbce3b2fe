"""One module per ``pyrobnn`` subcommand; each defines ``register(subparsers)``."""
