"""A ClientApp for tests only: dpfl's, behind a mod that makes a chosen node drop out at SecAgg+'s
unmask stage (after its masked vector is in the sum), deterministically: the node whose
environment has ``DPFL_TEST_EXIT_AT_UNMASK=1`` ends its ClientApp there with an error instead of
its key shares (an immediate error reply rather than a silent death, which the SuperLink would
only notice after its heartbeat timeout). Copied into a throw-away Flower app by the test."""

import os

from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from dpfl.flower.client_app import make_client_app


class DroppedAtUnmask(RuntimeError):
    """The test's drop-out: this node leaves the protocol at the unmask stage."""


def exit_at_unmask(msg, context, call_next):
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if (
        os.environ.get("DPFL_TEST_EXIT_AT_UNMASK") == "1"
        and configs is not None
        and configs.get(Key.STAGE) == Stage.UNMASK
    ):
        raise DroppedAtUnmask("this node leaves SecAgg+ at the unmask stage (test)")
    return call_next(msg, context)


app = make_client_app(mods=[exit_at_unmask])
