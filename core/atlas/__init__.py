"""Prototype labels and the UMAP atlas."""
