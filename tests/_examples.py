"""Import a script under examples/ as a module, for tests of its functions (examples/ is not a package)."""
import importlib.util
from pathlib import Path

_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """``examples/<name>.py`` executed as a fresh module named ``<name>_example``."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", _EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
