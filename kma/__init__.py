"""kma: the command line, the Python client of a kma server, and the tiny test student."""
