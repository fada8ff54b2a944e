"""``fides protect``: the integrity kit (verifier, detector, re-classifier) for a classifier
the user already has: a repository model, or a remote endpoint queried as a black box."""
