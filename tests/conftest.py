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


def pytest_collection_modifyitems(config, items):
    """The slow and long tests first, in collection order otherwise: pytest-xdist's workers then
    start them early and share out the short ones, rather than meeting a long test at the end
    with one worker idle. (Every worker sorts the same collection the same way.)"""
    def short(item) -> bool:
        return not (item.get_closest_marker("slow") or item.get_closest_marker("long"))

    items.sort(key=short)
