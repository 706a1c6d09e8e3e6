"""Training images: where they come from (a Hub dataset, a folder, an LSUN LMDB, a prepared dataset),
one preprocessing, the skip report, the resumable stream, and `prepare`."""
