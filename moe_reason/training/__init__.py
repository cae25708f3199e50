"""The training loop and what it owns: arguments, checkpoints and exports, optimizer, EMA, LoRA, metrics, the
output folder's layout, the plateau rule."""
