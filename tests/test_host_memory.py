"""reuse_freed_memory: XLA:CPU's per-execution temporaries stop page-faulting after the first run.
Each case runs in a fresh process: the setting is process-wide and must precede JAX's threads."""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r'''
    import json, os, resource, sys
    from jaxalign.host_memory import reuse_freed_memory
    applied = reuse_freed_memory() if sys.argv[1] == "on" else False
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sort(x * 2.0)[:4])  # a 64 MB temporary per call
    x = jnp.ones(16_000_000, jnp.float32)
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        f(x).block_until_ready()
    print(json.dumps({"applied": applied,
                      "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
''')


def _run(mode, env=None):
    import os

    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_temporaries_are_reused_instead_of_faulted_in_again():
    off, on = _run("off"), _run("on")
    assert on["applied"] is True
    # 4 calls x 64 MB of fresh pages = ~62K faults with glibc defaults; reused pages fault no more
    assert off["faults"] > 40_000, off
    assert on["faults"] < off["faults"] / 4, (on, off)


def test_opt_out_by_environment():
    assert _run("on", {"JAXALIGN_SYSTEM_MALLOC": "1"})["applied"] is False
