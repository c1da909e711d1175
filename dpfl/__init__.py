"""dpfl: federated learning with user-level differential privacy for PyTorch, built on Flower.

Your own model and data::

    import dpfl
    from dpfl.data import from_arrays

    data = from_arrays({"x": X, "y": y}, users=user_ids, test={"x": Xt, "y": yt})
    result = dpfl.simulate(MyTask(), data, {"rounds": 50, "cohort-size": 20, "clip-norm": 1.0,
                                            "target-epsilon": 4.0, "run-dir": "runs/mine"})
    result.epsilon, result.delta, result.statement, result.model

A task is any object with ``metric``, ``build_model()``, ``loss(model, batch)`` and
``evaluate(model, data)`` (:class:`dpfl.api.Task` lists the optional hooks).
"""

# The built-in recipes register their tables ([classification], [asr], [localization]) with the
# config, so every config read after `import dpfl...` knows their keys and old flat names.
from dpfl import recipes as _recipes  # noqa: E402, F401, I001
from dpfl.api import ClientData, FederatedDataset, Task, TensorData
from dpfl.config import RunConfig
from dpfl.simulation import Result, simulate

__version__ = "0.1.0"

__all__ = [
    "ClientData",
    "FederatedDataset",
    "Result",
    "RunConfig",
    "Task",
    "TensorData",
    "simulate",
]
