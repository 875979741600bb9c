"""The PRISM model: config, prototype head, causal LM and the clustering losses."""
