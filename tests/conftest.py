import os

# Under pytest-xdist (make test runs two workers on CI's two cores) each worker and everything it
# starts (CLI runs, torchrun ranks, Flower processes) computes on one thread: two workers of two
# threads each on two cores oversubscribe them and run slower than one test at a time.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import torch

    torch.set_num_threads(1)

from hypothesis import HealthCheck, settings  # noqa: E402

# Torch calls have uneven latency on a loaded 2-core CI machine: no per-example deadline.
settings.register_profile(
    "dpfl", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dpfl"))
