"""Dropout-stability pipeline: ingest -> windows -> models -> train -> stability -> tune -> final."""
