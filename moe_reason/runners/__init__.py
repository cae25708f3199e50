"""Studies: the ablation and comparison runners, their run records, statistics and reports."""
