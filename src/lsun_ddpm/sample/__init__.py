"""Sampling and interpolation from a pipeline folder or Hub repo."""
