"""Text data: documents, tokenizer, train/validation split, packing, the cache, streaming."""
