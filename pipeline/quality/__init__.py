"""Data checks: per-image measurement, the Great Expectations suite, drift features and tests."""
