"""Tools on top of runs: the report (privacy statement, plots, comparisons) and the empirical
privacy audit."""
