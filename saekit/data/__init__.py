"""Corpora (packaged default, local files, hub names) and synthetic planted-feature data."""
