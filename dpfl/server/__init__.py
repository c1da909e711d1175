"""Flower ServerApp, the DP-FedAvg strategy and server optimizers (issue [2/8]).

Empty until the federated core lands; the package exists so the layout of DESIGN.md is fixed.
"""
