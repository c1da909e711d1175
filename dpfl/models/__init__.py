"""Models trained with dpfl and the optimizer / normalisation registries (issues [2/8]-[5/8]).

Empty until those issues land; the package exists so the layout of DESIGN.md is fixed.
"""
