"""The round loop every way of running shares (:mod:`dpfl.loop.run`), over a task, a federated
dataset and the run config; the run folder (:mod:`dpfl.loop.writer`), resumption
(:mod:`dpfl.loop.resume`) and the privacy plan and statement (:mod:`dpfl.loop.plan`)."""
