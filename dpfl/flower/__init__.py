"""dpfl on Flower: the ServerApp, the ClientApp and the DP-FedAvg strategy.

A project's ``pyproject.toml`` names them (Flower loads ``module:attribute`` and calls
nothing)::

    [tool.flwr.app.components]
    serverapp = "dpfl.flower:server_app"
    clientapp = "dpfl.flower:client_app"

with the task and data in the run config (``task = "mypkg.digits:make_task"``, ``data =
"mypkg.digits:make_data"``, options in ``[tool.flwr.app.config.task-options]``). To pass objects
instead, write ``server_app = make_server_app(task=..., data=...)`` (and the same for the client)
in your own module and name that.
"""

from dpfl.flower.client_app import app as client_app
from dpfl.flower.client_app import make_client_app
from dpfl.flower.server_app import app as server_app
from dpfl.flower.server_app import make_server_app
from dpfl.flower.strategy import DPFedAvg

__all__ = ["DPFedAvg", "client_app", "make_client_app", "make_server_app", "server_app"]
