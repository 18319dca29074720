"""Helpers that start real servers for the tests on loopback ports."""
