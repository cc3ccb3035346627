"""Runs a script in a fresh process with native kernels unavailable (no compiler, or switched off)
and an empty kernel cache: what the fallback tests of each native kernel check."""

import os
import subprocess
import sys

CASES = [({"CXX": "no-such-compiler"}, 1), ({"JAXALIGN_NATIVE": "0"}, 0)]  # (env, warnings)


def last_line(script: str, cache_dir, env: dict) -> str:
    """The script's last line of output; fails the test with its stderr when it fails."""
    full = {**os.environ, "JAXALIGN_CACHE_DIR": str(cache_dir), "JAX_PLATFORMS": "cpu", **env}
    out = subprocess.run([sys.executable, "-c", script], env=full, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]
