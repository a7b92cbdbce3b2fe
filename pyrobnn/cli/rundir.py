"""The run directory: what a ``pyrobnn fit`` / ``sample`` run owns on disk, and what may happen to it.

A run directory is a unit: ``run.json`` records the config, its fingerprint and the library version;
training state lives in ``checkpoints/`` (``fit``) or ``chains/`` (``sample``); the results are
``metrics.json``, ``history.csv``, ``model.safetensors`` / ``posterior.safetensors`` and
``inference_data.nc`` (the posterior as ArviZ data, read by ``pyrobnn report``).

:func:`open_run` decides what may happen to a directory before any work is done:

* a new run needs an empty (or absent) directory;
* ``resume`` continues the run there, after checking that the stored config equals the given one
  (``train.epochs`` / ``sample.num_chains`` may grow; ``force`` skips the check); with nothing to
  resume it fails, ``resume_or_start`` starts a new run instead;
* ``overwrite`` replaces the run there: the old one is moved aside and deleted only once the new run
  has written its first checkpoint; if the new run fails before that, the old one is put back.

A new run that fails before its first checkpoint leaves nothing behind.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["open_run", "RunDirectory", "RunError", "Interrupted", "write_json", "config_fingerprint", "config_diff",
           "interrupt_guard", "RUN_FILE"]

RUN_FILE = "run.json"
#: config keys that may grow on --resume (the run goes on for longer)
GROWABLE = ("train.epochs", "sample.num_chains")


class RunError(ValueError):
    """A run directory cannot be used as asked (occupied, nothing to resume, config mismatch)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped a run after writing its state; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def write_json(path, obj):
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    from pyrobnn.io import atomic_write_bytes
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# -- configs: fingerprint and diff -------------------------------------------------------------------------
def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def config_fingerprint(cfg: Dict[str, Any]) -> str:
    """SHA-256 of the config's canonical JSON (sorted keys, tuples as lists)."""
    return hashlib.sha256(json.dumps(_jsonable(cfg), sort_keys=True).encode()).hexdigest()


def _flatten(cfg, prefix="") -> Dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(stored: Dict[str, Any], given: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``[(dotted key, stored value, given value)]`` of the keys that differ, except a growable key
    (:data:`GROWABLE`) whose given value is larger."""
    a, b = _flatten(_jsonable(stored)), _flatten(_jsonable(given))
    diff = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va == vb:
            continue
        if key in GROWABLE and isinstance(va, int) and isinstance(vb, int) and vb > va:
            continue
        diff.append((key, va, vb))
    return diff


def _format_diff(diff, limit=6) -> str:
    shown = "; ".join(f"{k}: {json.dumps(a)} in the run, {json.dumps(b)} given" for k, a, b in diff[:limit])
    more = f"; and {len(diff) - limit} more" if len(diff) > limit else ""
    return shown + more


# -- the run directory -------------------------------------------------------------------------------------
def _has_files(d: Path) -> bool:
    return d.is_dir() and any(d.iterdir())


def _checkpoints(out: Path, command: str) -> List[str]:
    pattern = "checkpoints/ckpt-e*-s*.safetensors" if command == "fit" else "chains/chain-*.safetensors"
    return sorted(glob.glob(os.path.join(str(out), pattern)))


class RunDirectory:
    """What :func:`open_run` decided for one directory; use as a context manager around the work."""

    def __init__(self, out: Path, cfg: Dict[str, Any], command: str, resuming: bool, replacing: bool):
        self.out, self.cfg, self.command = out, cfg, command
        self.resuming, self.replacing = resuming, replacing
        self.aside: Optional[Path] = None
        self.created: Optional[Path] = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / ("checkpoints" if self.command == "fit" else "chains")

    def has_checkpoint(self) -> bool:
        return bool(_checkpoints(self.out, self.command))

    def __enter__(self):
        from pyrobnn import __version__
        if self.replacing and _has_files(self.out):
            self.aside = self.out.parent / f".{self.out.name}.replaced-{os.getpid()}-{int(time.time())}"
            os.replace(self.out, self.aside)
        if not self.out.exists():
            top = self.out
            while not top.parent.exists():
                top = top.parent
            self.out.mkdir(parents=True)
            self.created = top  # the outermost directory made here: removed again if the run fails early
        record = {"command": self.command, "config": _jsonable(self.cfg), "fingerprint": config_fingerprint(self.cfg),
                  "pyrobnn_version": __version__}
        if self.resuming and (self.out / RUN_FILE).is_file():
            try:
                old = json.loads((self.out / RUN_FILE).read_text())
                record["created"] = old.get("created")
                record["resumed"] = list(old.get("resumed", [])) + [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())]
            except (ValueError, OSError):
                pass
        record.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json(self.out / RUN_FILE, record)
        return self

    def checkpointed(self, *_):
        """Called once the new run has a checkpoint: the replaced run is deleted now."""
        if self.aside is not None and self.has_checkpoint():
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None
        return False

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.aside is not None:
                shutil.rmtree(self.aside, ignore_errors=True)
                self.aside = None
            return False
        if self.resuming or self.has_checkpoint():
            self.checkpointed()
            return False          # a resumable run stays
        # failed before its first checkpoint: leave nothing behind, put a replaced run back
        if self.created or self.aside is not None:
            shutil.rmtree(self.created or self.out, ignore_errors=True)
        if self.aside is not None:
            os.replace(self.aside, self.out)
            self.aside = None
        return False


def open_run(out, cfg: Dict[str, Any], command: str = "fit", *, resume: bool = False,
             resume_or_start: bool = False, overwrite: bool = False, force: bool = False) -> RunDirectory:
    """Check what may be done with the directory ``out`` (nothing is written here); see the module doc."""
    out = Path(out)
    if resume and resume_or_start:
        raise RunError("give either --resume or --resume-or-start, not both")
    if overwrite and (resume or resume_or_start):
        raise RunError("--overwrite replaces the run; --resume continues it: give one of them")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory")
    if resume or resume_or_start:
        if _checkpoints(out, command):
            run_file = out / RUN_FILE
            stored = None
            if run_file.is_file():
                try:
                    stored = json.loads(run_file.read_text())
                except ValueError:
                    stored = None
            if not force:
                if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
                    raise RunError(f"{out} has checkpoints but no readable {RUN_FILE} to check the config against; "
                                   "pass --force to resume anyway")
                if stored.get("command", command) != command:
                    raise RunError(f"{out} holds a `pyrobnn {stored.get('command')}` run, not a `pyrobnn {command}` run")
                diff = config_diff(stored["config"], cfg)
                if diff:
                    raise RunError(f"the config differs from the run in {out}: {_format_diff(diff)}. Start a new run "
                                   "in another --out, or pass --force to resume with the new settings")
            return RunDirectory(out, cfg, command, resuming=True, replacing=False)
        if resume:
            raise RunError(f"nothing to resume in {out}: no checkpoint there. Pass --resume-or-start to start a "
                           "new run when there is none")
    if _has_files(out) and not overwrite:
        what = "a pyrobnn run" if (out / RUN_FILE).is_file() else "files"
        raise RunError(f"{out} already holds {what}; pass --resume to continue it or --overwrite to replace it")
    return RunDirectory(out, cfg, command, resuming=False, replacing=overwrite)


# -- interrupts ------------------------------------------------------------------------------------------
class interrupt_guard:
    """``with interrupt_guard() as stop:`` — SIGINT/SIGTERM set ``stop.signum`` instead of raising, so
    the loop can finish its step and save (``stop()`` is true then); a second signal raises
    ``KeyboardInterrupt`` at once (``immediate=True``: the first one does). Outside the main thread it
    does nothing."""

    def __init__(self, immediate: bool = False):
        self.signum: Optional[int] = None
        self.immediate = immediate  # raise KeyboardInterrupt at the first signal (loops with no step to finish)
        self._old = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        first = self.signum is None
        self.signum = self.signum or signum
        if self.immediate or not first:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name


# -- building ---------------------------------------------------------------------------------------------
