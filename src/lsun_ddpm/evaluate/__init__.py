"""Evaluation: the feature extractors (Inception, LPIPS), one pass over a dataset, FID/KID/precision/recall, nearest neighbours, reports."""
