"""Selectors: how many columns a router picks per item (top-k, top-p, dense)."""
