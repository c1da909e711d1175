"""Engines that drive the round loop: the in-process simulator (:mod:`dpfl.engines.inprocess`)
and its torchrun scale-out (:mod:`dpfl.engines.torchrun`). Flower is the third
(:mod:`dpfl.flower`)."""
