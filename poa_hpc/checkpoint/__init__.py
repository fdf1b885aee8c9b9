"""Checkpoint files, below both the trainer and the engines: :mod:`.layout` (the per-step
history, ``last.pt``, atomic writes, pruning, loading)."""
