"""Evaluation of retrieval and answers on datasets in BEIR layout (composes ingest + retrieval)."""
