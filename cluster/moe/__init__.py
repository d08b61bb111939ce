"""Mixture-of-experts execution: expert weights (layer), backends (how), executors (where)."""
