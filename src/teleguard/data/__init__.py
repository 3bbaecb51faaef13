"""Call data: records, ingestion, timing, audio, streaming prefixes, round samples, splits, storage."""
