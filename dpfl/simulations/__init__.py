"""In-process federated simulator, federated datasets and synthetic data (issue [2/8]).

Empty until the simulator lands; the package exists so the layout of DESIGN.md is fixed.
"""
