"""Flower ClientApp and the local training step (issue [2/8]).

Empty until the federated core lands; the package exists so the layout of DESIGN.md is fixed.
"""
