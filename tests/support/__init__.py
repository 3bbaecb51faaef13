"""Helpers shared by the tests: stand-in servers, fixtures' builders, paths."""
