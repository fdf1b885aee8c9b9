"""Tiny configurations of every registered backbone family, shared by the tests.

``MODEL[family]`` sets ``model.arch`` and the family's section to a network that runs a POA
step in well under a second on a CPU, with an elastic space of a few widths and depths, plus
the data sizes it needs (crops, the digits upscaling).  A family registered without an entry
here fails ``test_every_registered_family_has_a_tiny_config``.
"""

MODEL = {
    "vit": [
        "model.arch=vit", "model.vit.img_size=16", "model.vit.patch_size=4", "model.vit.embed_dim=32",
        "model.vit.depth=4", "model.vit.num_heads=4", "model.vit.min_width=16", "model.vit.width_step=8",
        "model.vit.min_depth=2",
        "data.digits_size=16", "data.global_size=16", "data.local_size=8",
    ],
}

HEADS = ["head.prototypes=[32,48]", "head.hidden_dim=32", "head.bottleneck_dim=16"]


def tiny(family: str = "vit") -> list:
    """Model and head overrides of the tiny ``family`` network."""
    return MODEL[family] + HEADS


# ---------------------------------------------------------------- optimizer rules, written out by hand
def vit_rules(name: str):
    """(layer id, no weight decay) of a tiny-ViT student parameter (depth 4: ids 0..5), by hand:
    tokens and patch embedding 0, block i i + 1, final norm and heads 5; no decay on biases,
    LayerNorms and LayerScales; the [CLS] token, position embedding and mask token keep it."""
    table = {
        "backbone.patch_embed.proj.weight": (0, False), "backbone.patch_embed.proj.bias": (0, True),
        "backbone.cls_token": (0, False), "backbone.pos_embed": (0, False), "backbone.mask_token": (0, False),
        "backbone.norm.weight": (5, True), "backbone.norm.bias": (5, True),
    }
    for i in range(4):
        for p, no_wd in (("norm1.weight", True), ("norm1.bias", True), ("attn.qkv.weight", False),
                         ("attn.qkv.bias", True), ("attn.proj.weight", False), ("attn.proj.bias", True),
                         ("ls1.gamma", True), ("norm2.weight", True), ("norm2.bias", True),
                         ("mlp.fc1.weight", False), ("mlp.fc1.bias", True), ("mlp.fc2.weight", False),
                         ("mlp.fc2.bias", True), ("ls2.gamma", True)):
            table[f"backbone.blocks.{i}.{p}"] = (i + 1, no_wd)
    if name.startswith("heads."):
        return 5, name.endswith(".bias")
    return table[name]


RULES = {"vit": vit_rules}
