"""Presets: model configurations by name (installed as `illada_jax.configs`)."""
