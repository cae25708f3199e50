"""The models: configurations, modeling files, expert kernels and the chunked loss (the set save_pretrained
copies beside a model for trust_remote_code: these import only each other), and conversion from Mixtral."""
