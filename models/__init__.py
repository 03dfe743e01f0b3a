"""Models: River estimators built from the spec, the champion replica a scorer
serves, and the registry of signed model versions."""
