"""The server's step: validate every update, sum, add the Gaussian noise, divide by the expected
cohort, apply the server optimizer and charge the ledger (:mod:`dpfl.server.round`); secret
cohort sampling (:mod:`dpfl.server.sampling`)."""
