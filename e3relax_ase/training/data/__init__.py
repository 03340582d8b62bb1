"""Training data: the pair format, importers, splits, data cards, seeds, perturbations and families."""
