"""Persistence: models, engine, migrations and repository functions."""
