"""Corpora: load, tokenise, pack and split; the demo corpus and its tasks."""
