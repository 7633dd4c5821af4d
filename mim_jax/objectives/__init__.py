"""Losses as plain jnp functions (no modules, no training state)."""
