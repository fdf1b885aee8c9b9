"""poa_hpc: POA (Pre-training Once for models of All sizes) trainer."""

__version__ = "0.1.0"
