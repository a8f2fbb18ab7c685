"""Baselines the benches measure dopsd_fast against, re-implemented from their released code (method.md)."""
