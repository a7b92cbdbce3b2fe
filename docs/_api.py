"""Writes the API reference pages (docs/api/*.rst) from the packages' ``__all__`` and checks coverage.

Each public name is documented once, where a user imports it from: ``pyrobnn.priors.Gaussian``, not
``pyrobnn.priors.gaussian.Gaussian``. A submodule's page section lists only what its package does not
re-export. After the build, :func:`check_coverage` warns (an error under ``-W``) for any class or
function in a public ``__all__`` that the reference does not show — in particular one without a
docstring, which autodoc skips.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re

ROOTS = ("pyrobnn", "pyrobnn.inference", "pyrobnn.models")
PACKAGES = ("pyrobnn.priors", "pyrobnn.guides", "pyrobnn.inference", "pyrobnn.models")
# the CLI has its own page (its configs and runs do not); bnn is all in pyrobnn
SKIP = ("pyrobnn.cli.commands", "pyrobnn.bnn")
SKIP_EXACT = ("pyrobnn.cli",)


def public_modules():
    names = []
    for root in ROOTS:
        pkg = importlib.import_module(root)
        for info in pkgutil.walk_packages(pkg.__path__, root + "."):
            parts = info.name.split(".")
            if any(p.startswith("_") for p in parts) or info.name.startswith(SKIP) or info.name in SKIP_EXACT:
                continue
            if info.name not in names:
                names.append(info.name)
    return names


def exported(module_name):
    """Non-module names of ``module_name.__all__`` with their objects."""
    mod = importlib.import_module(module_name)
    return [(n, getattr(mod, n)) for n in getattr(mod, "__all__", []) if not inspect.ismodule(getattr(mod, n))]


def _documentable(obj):
    return inspect.isclass(obj) or inspect.isfunction(obj)


def _underline(title, ch):
    return f"{title}\n{ch * len(title)}\n"


def _module_block(name, members, elsewhere):
    """An automodule block for ``name`` with ``members``; per-object directives when the module's
    name is shadowed in its package by an object (``pyrobnn.relevance`` is a function)."""
    parent, _, last = name.rpartition(".")
    shadowed = not inspect.ismodule(getattr(importlib.import_module(parent), last, None))
    if not shadowed:
        opts = f"   :members: {', '.join(members)}\n" if members else ""
        return f".. automodule:: {name}\n{opts}\n"
    out = f".. py:currentmodule:: {name}\n\n"
    mod = importlib.import_module(name)
    if mod.__doc__:
        lines = inspect.cleandoc(mod.__doc__).splitlines()
        escape_bars(None, "module", name, mod, None, lines)
        out += "\n".join(lines) + "\n\n"
    for m in members:
        kind = "autoclass" if inspect.isclass(getattr(mod, m)) else "autofunction" if callable(getattr(mod, m)) else "autodata"
        out += f".. {kind}:: {m}\n" + ("   :members:\n" if kind == "autoclass" else "") + "\n"
    return out


def write_pages(outdir):
    os.makedirs(outdir, exist_ok=True)
    top_objs = {id(o) for _, o in exported("pyrobnn")}
    pages = {}
    top_members = [n for n, _ in exported("pyrobnn")]
    pages["pyrobnn"] = (_underline("pyrobnn", "=") + "\nThe top-level namespace.\n\n"
                        f".. automodule:: pyrobnn\n   :members: {', '.join(top_members)}\n\n")
    for name in public_modules():
        if name in PACKAGES:
            continue
        pkg = next((p for p in PACKAGES if name.startswith(p + ".")), None)
        taken = set(top_objs)
        parts = name.split(".")
        for i in range(2, len(parts)):  # every package above the module documents what it re-exports
            taken |= {id(o) for _, o in exported(".".join(parts[:i]))}
        members = [n for n, o in exported(name) if id(o) not in taken]
        block = _module_block(name, members, taken)
        if pkg:
            pages.setdefault(pkg, _package_page(pkg))
            pages[pkg] += _underline(f"{name}", "-") + "\n" + block
        else:
            pages[name] = _underline(name, "=") + "\n" + block
    for pkg in PACKAGES:
        pages.setdefault(pkg, _package_page(pkg))
    pages["cli"] = cli_page()
    for page, text in pages.items():
        path = os.path.join(outdir, page + ".rst")
        old = open(path).read() if os.path.exists(path) else None
        if old != text:  # keep mtimes so incremental builds stay incremental
            with open(path, "w") as fh:
                fh.write(text)
    for f in os.listdir(outdir):
        if f.endswith(".rst") and f[:-4] not in pages:
            os.remove(os.path.join(outdir, f))


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def cli_page():
    """The ``--help`` of ``pyrobnn`` and of every subcommand, as the parser prints it."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it for the page
    from pyrobnn.cli import build_parser

    def block(parser):
        text = parser.format_help().rstrip()
        return "::\n\n" + "\n".join(("   " + line) if line else "" for line in text.splitlines()) + "\n\n"

    out = _underline("Command line reference", "=") + "\nGenerated from the parsers of :mod:`pyrobnn.cli`.\n\n"
    root = build_parser()
    out += _underline("pyrobnn", "-") + "\n" + block(root)
    todo = [("pyrobnn " + name, p) for name, p in _subparsers(root).items()]
    while todo:
        title, parser = todo.pop(0)
        out += _underline(title, "-") + "\n" + block(parser)
        todo[:0] = [(f"{title} {name}", p) for name, p in _subparsers(parser).items()]
    return out


def _package_page(pkg):
    members = [n for n, _ in exported(pkg)]
    return (_underline(pkg, "=") + "\n" + f".. automodule:: {pkg}\n   :members: {', '.join(members)}\n\n"
            + ("Submodules: what the package does not re-export.\n\n" if pkg != "pyrobnn.models" else ""))


def check_coverage(app, env):
    """Every class and function of a public ``__all__`` appears in the reference (so it has a docstring)."""
    from sphinx.util import logging

    log = logging.getLogger("pyrobnn.api")
    documented = set()
    for fullname in env.domains["py"].objects:
        mod, _, attr = fullname.rpartition(".")
        try:
            documented.add(id(getattr(importlib.import_module(mod), attr)))
        except Exception:
            continue
    for name in ["pyrobnn"] + public_modules():
        for n, obj in exported(name):
            if _documentable(obj) and id(obj) not in documented:
                log.warning(f"{name}.{n} is public (in __all__) but not in the API reference: give it a docstring")


def lookup(dotted):
    """The Python object named ``dotted`` (a module path, then attributes), or raise LookupError."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise LookupError(dotted)


_MISSING = object()


def _documented_names(env):
    cache = getattr(env, "_pyrobnn_documented", None)
    if cache is None:
        cache = {}
        for fullname in env.domains["py"].objects:
            try:
                obj = lookup(fullname)
            except LookupError:
                continue
            cache.setdefault(id(obj), fullname)
        env._pyrobnn_documented = cache
    return cache


def resolve_alias(app, env, node, contnode):
    """Resolve a Python reference that Sphinx could not: the name is written as the code sees it
    (``load`` inside :mod:`pyrobnn.io`, ``pyrobnn.guides.base.GuideNormal``); link it to where the
    reference documents that object. A name that exists but is not documented (a private helper, a
    constant) stays plain text; a name that does not exist at all is left to fail the build."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    mod, cls = node.get("py:module"), node.get("py:class")
    candidates = [f"{mod}.{cls}.{target}" if mod and cls else None, f"{mod}.{target}" if mod else None, target]
    # a docstring speaks in the names of the module that defines it, which may be a submodule
    scope = [m for m in public_modules() if mod and m.startswith(mod + ".")] + public_modules()
    candidates += [f"{m}.{target}" for m in scope]
    for cand in filter(None, candidates):
        try:
            obj = lookup(cand)
        except LookupError:
            continue
        fullname = _documented_names(env).get(id(obj))
        if fullname is None:
            return contnode
        domain = env.domains["py"]
        return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"] if node["reftype"] != "mod" else "obj",
                                   fullname, node, contnode) or domain.resolve_xref(
            env, node["refdoc"], app.builder, "obj", fullname, node, contnode)
    return None


_LITERAL = re.compile(r"(``.*?``)")


def escape_bars(app, what, name, obj, options, lines):
    """Docstrings write absolute values and norms as ``|w|``, ``‖w‖``; in reST ``|w|`` is a substitution.
    Escape bars outside inline literals (no docstring here uses substitutions or reST tables)."""
    for i, line in enumerate(lines):
        parts = _LITERAL.split(line)
        lines[i] = "".join(p if p.startswith("``") else p.replace("|", "\\|") for p in parts)
