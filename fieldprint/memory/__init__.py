"""Pacemaker and promotion: typed states, taint, overrides, vector index."""
