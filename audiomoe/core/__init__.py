"""The core of audiomoe: interfaces, specs, hookspecs, the registry and the composer.

Importing this package does not import torch; :mod:`audiomoe.core.interfaces` does.
"""
