"""`python -m genctl_jax.train`, except that process 1 compiles its train step SLOW_COMPILE_S late.

Simulates a process that compiles much later than process 0, as on a busy machine where only
process 0 hits the compilation cache. Used by tests/test_multiprocess.py.
"""

import os
import runpy
import time

from jax._src import compiler


def _slow_compile(compile_fn, delay_s):
    def compile_and_load(backend, module, *args, **kwargs):
        name = str(module.operation.attributes["sym_name"])
        if "train_step" in name:
            time.sleep(delay_s)
        return compile_fn(backend, module, *args, **kwargs)

    return compile_and_load


if os.environ.get("GENCTL_PROCESS_ID") == "1":
    compiler.backend_compile_and_load = _slow_compile(
        compiler.backend_compile_and_load, float(os.environ["SLOW_COMPILE_S"])
    )
runpy.run_module("genctl_jax.train", run_name="__main__")
