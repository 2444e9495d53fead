"""The one import of triton for every kernel file: `triton`/`tl` (None where triton is not
installed) and `jit`, which is triton.jit there and leaves the function as it is elsewhere, so the
kernel files import, and their torch references run, on any machine."""
from __future__ import annotations

import sysconfig

# NOTE: Python 3.11's sysconfig publishes its config-vars dict before it has filled it, and
# triton's import reads it (triton/knobs.py: binary += sysconfig.get_config_var("EXE")). A full
# test run once died there with "can only concatenate str (not NoneType)": the chat engine thread
# imported triton here while the embedding thread's model build imported it too, through
# torch._dynamo, which reads sysconfig first. Two fixes: fill the dict now, before triton, on the
# thread that imports it; and let no model build import triton behind this module's back (the
# models import minserve.kernels before they build, and create parameters with torch.empty:
# nn.Embedding's init on the meta device is what imported torch._dynamo).
# tests/test_loader.py::test_model_builds_import_triton_only_through_kernels checks the second.
sysconfig.get_config_vars()

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references still work, the kernels are never called
    triton = tl = None

jit = triton.jit if triton is not None else (lambda fn: fn)
