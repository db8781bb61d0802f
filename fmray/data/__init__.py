"""Built-in synthetic corpora and tasks, tokenizers, and Ray Data pipelines."""
