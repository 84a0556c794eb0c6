"""Everything that talks to MLflow: runs, lineage tags, aliases, the pyfunc, model sources."""
