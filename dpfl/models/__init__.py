"""The models users train with dpfl (an MLP, CTC speech recognisers, OFVL-MS localisation nets)
and the registries of client/server optimizers and normalisation layers by name."""
