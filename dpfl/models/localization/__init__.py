"""Multi-scene visual localisation (OFVL-MS) as federated multi-task learning."""
