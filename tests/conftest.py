import os

from hypothesis import HealthCheck, settings

# Torch calls have uneven latency on a loaded 2-core CI machine: no per-example deadline.
settings.register_profile(
    "dpfl", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dpfl"))
