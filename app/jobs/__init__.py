"""Audit jobs: submit one against a dataset and a student, follow it, read its results."""
