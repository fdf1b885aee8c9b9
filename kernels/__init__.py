"""Compute kernels (installed as ``poa_hpc.kernels``); they know nothing of POA."""
