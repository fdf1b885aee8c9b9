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
    # Stage widths 16/32/64/128 (widths 8, 12, 16; head dim 4), depths 2-2-4-2 (stage-3 depths 2..4: a
    # sub-network of depth 3 keeps blocks 0, 1, 3, two shifted blocks in a row).  Window 4 on 32 px
    # crops: stage maps 16, 8, 4 (one window, shifted) and 2 (padded to a window); 16 px local crops
    # pad stages 3 and 4.  iBOT grid 32 / 2 / 8 * 2 = 4.
    "swin": [
        "model.arch=swin", "model.swin.img_size=32", "model.swin.patch_size=2", "model.swin.embed_dim=16",
        "model.swin.depths=[2,2,4,2]", "model.swin.head_dim=4", "model.swin.window_size=2",
        "model.swin.min_width=8", "model.swin.width_step=4", "model.swin.min_depth=2",
        "data.digits_size=32", "data.global_size=32", "data.local_size=16",
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


def swin_rules(name: str):
    """(layer id, no weight decay) of a tiny-Swin student parameter (depths 2-2-4-2: ids 0..11), by hand,
    as the authors' get_swin_lr_decay_rate: patch embedding and mask token 0; stage 0 blocks 1, 2; the
    merge into stage 1 and its block 0 both 3, block 1 4; merge into stage 2 5, blocks 5..8; merge into
    stage 3 9, blocks 9, 10; final norm and heads 11.  No decay on biases and LayerNorms; the relative
    position bias tables and the mask token keep it (authors)."""
    table = {
        "backbone.patch_embed.proj.weight": (0, False), "backbone.patch_embed.proj.bias": (0, True),
        "backbone.patch_embed.norm.weight": (0, True), "backbone.patch_embed.norm.bias": (0, True),
        "backbone.mask_token": (0, False),
        "backbone.norm.weight": (11, True), "backbone.norm.bias": (11, True),
    }
    block_layer = {(0, 0): 1, (0, 1): 2, (1, 0): 3, (1, 1): 4, (2, 0): 5, (2, 1): 6, (2, 2): 7, (2, 3): 8,
                   (3, 0): 9, (3, 1): 10}
    for (s, j), layer in block_layer.items():
        for p, no_wd in (("norm1.weight", True), ("norm1.bias", True), ("attn.qkv.weight", False),
                         ("attn.qkv.bias", True), ("attn.proj.weight", False), ("attn.proj.bias", True),
                         ("attn.relative_position_bias_table", False), ("norm2.weight", True),
                         ("norm2.bias", True), ("mlp.fc1.weight", False), ("mlp.fc1.bias", True),
                         ("mlp.fc2.weight", False), ("mlp.fc2.bias", True)):
            table[f"backbone.layers.{s}.blocks.{j}.{p}"] = (layer, no_wd)
    for s, layer in ((1, 3), (2, 5), (3, 9)):
        table[f"backbone.layers.{s}.downsample.norm.weight"] = (layer, True)
        table[f"backbone.layers.{s}.downsample.norm.bias"] = (layer, True)
        table[f"backbone.layers.{s}.downsample.reduction.weight"] = (layer, False)
    if name.startswith("heads."):
        return 11, name.endswith(".bias")
    return table[name]


RULES = {"vit": vit_rules, "swin": swin_rules}
