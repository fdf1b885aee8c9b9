"""Launching training: the stop/requeue protocol shared by ``poa train`` and ``poa submit`` (Slurm)."""
