"""The module maps stay true: every module and package of minserve/ (and kernels/) is named in
minserve/__init__.py's module map and in the README's file map."""
from __future__ import annotations

import pathlib

import minserve

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _names() -> set[str]:
    pkg = ROOT / "minserve"
    modules = {p.stem for p in pkg.glob("*.py") if not p.stem.startswith("__")}
    packages = {p.name for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    return modules | packages


def _missing(names: set[str], text: str) -> set[str]:
    return {n for n in names if n not in text}


def test_every_module_is_on_both_maps():
    names = _names()
    assert {"serving", "launch", "engine", "batch"} <= names
    assert _missing(names, minserve.__doc__) == set()
    readme = (ROOT / "README.md").read_text()
    file_map = readme.split("### File map\n", 1)[1].split("\n### ", 1)[0]
    assert _missing(names, file_map) == set()
    kernel_files = {p.name for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__"}
    assert _missing(kernel_files, file_map) == set()
    # the check sees a module the maps leave out
    assert _missing({"serving", "no_such_module"}, minserve.__doc__) == {"no_such_module"}
