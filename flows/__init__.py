"""Prefect flows: orchestration only; every stage's work lives in dvc.yaml and pipeline/."""
