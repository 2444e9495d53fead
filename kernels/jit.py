"""The one import of triton for every kernel file: `triton`/`tl` (None where triton is not
installed) and `jit`, which is triton.jit there and leaves the function as it is elsewhere, so the
kernel files import, and their torch references run, on any machine."""
from __future__ import annotations

import sysconfig

# NOTE: Python 3.11's sysconfig publishes its config-vars dict before it has filled it, and
# triton's import reads it (triton/knobs.py: binary += sysconfig.get_config_var("EXE")). A full
# test run once died there ("can only concatenate str (not NoneType)"): the chat engine thread
# imported triton through minserve.kernels while the embedding thread's model build, on the
# meta device, imported torch._dynamo, which reads sysconfig and imports triton too. So: fill
# the dict here, on the importing thread, before triton; and no model build imports
# torch._dynamo (the layers create their parameters with torch.empty, see models/linear.py), so
# this module is the one importer of triton and Python's module lock serializes threads on it.
# A race cannot be made to happen on demand in a test; tests/test_loader.py::
# test_model_builds_import_triton_only_through_kernels checks that invariant instead.
sysconfig.get_config_vars()



def _wants_triton() -> bool:
    """Importing triton costs ~70 MiB of resident memory (bench/RESULTS.md, "Memory"), and a
    process without CUDA never launches a Triton kernel, unless the interpreter is asked for
    (TRITON_INTERPRET=1: the kernel tests). MINSERVE_IMPORT_TRITON=1 imports it regardless."""
    from minserve import env

    if env.IMPORT_TRITON:
        return True
    import torch

    return torch.cuda.is_available()


try:
    if not _wants_triton():
        raise ImportError("no CUDA device: the torch references serve")
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references still work, the kernels are never called
    triton = tl = None

jit = triton.jit if triton is not None else (lambda fn: fn)
