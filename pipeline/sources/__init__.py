"""Ingestion sources: each yields (image bytes, caption, file extension) for the ingest stage."""
