"""Downstream evaluation: face alignment and face parsing."""
