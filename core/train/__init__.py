"""Training PRISM and its dense twin through the transformers Trainer."""
