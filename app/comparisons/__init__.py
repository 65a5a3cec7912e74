"""Comparisons: how students audited on one dataset differ, example by example."""
