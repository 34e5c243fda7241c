"""Data: synthetic audio generators (offline, numpy/torch only) and batching helpers."""
