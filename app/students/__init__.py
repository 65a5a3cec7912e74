"""The student registry: the models the operator lets jobs audit, each under a name."""
