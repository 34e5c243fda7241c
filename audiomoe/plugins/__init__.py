"""Plugins shipped with audiomoe (the built-in components are registered like any third party's)."""
