"""Shared test helpers: the released UniMoE-Audio reference, the fork server of the kill tests, the EP worker."""
