"""Routing policies: what a router looks at (scorer) and how many it picks (selector)."""
