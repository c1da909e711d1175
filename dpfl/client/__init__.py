"""One client's step: local training from the global weights, the delta, and its clipping
(:mod:`dpfl.client.train`), and a whole cohort's steps as one vectorised computation
(:mod:`dpfl.client.vectorized`)."""
