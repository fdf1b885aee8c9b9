from poa_hpc.losses.dino import cross_entropy, dino_cross_view_loss, same_view_loss, sinkhorn_knopp, softmax_target
from poa_hpc.losses.ibot import ibot_patch_loss
from poa_hpc.losses.koleo import koleo_loss

__all__ = [
    "cross_entropy",
    "dino_cross_view_loss",
    "ibot_patch_loss",
    "koleo_loss",
    "same_view_loss",
    "sinkhorn_knopp",
    "softmax_target",
]
