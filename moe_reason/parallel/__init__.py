"""Expert parallelism: the experts of each MoE layer split over ranks (DeepSpeed's groups)."""
