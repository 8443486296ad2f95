"""Test support: small self-contained runs and helpers shared by tests and benchmarks (not library code).

Tests import it as `support.*` (pytest puts tests/ on sys.path); scripts put the repo root on
sys.path and import `tests.support.*`.
"""
