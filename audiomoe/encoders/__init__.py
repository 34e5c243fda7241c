"""Audio encoders (each a plugin component registered by the built-in plugin)."""
