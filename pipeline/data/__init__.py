"""Images and their decoding, captions, buckets, the synthetic shapes, the ingestion sources."""
