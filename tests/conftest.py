"""Suite-wide settings: hypothesis without per-example deadlines (the first example of a jitted
property compiles) and derandomised in CI so a red build reproduces."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("jaxalign", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow],
                          derandomize=bool(os.environ.get("CI")), print_blob=True)
settings.load_profile("jaxalign")
