"""Validation and geometry of an emotion bank: layer sweeps, human norms, clustering, logit lens."""
