"""Estimates: what a job would take (generations, cache hits, time) before it is submitted."""
