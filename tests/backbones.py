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
    # sub-network of depth 3 keeps blocks 0, 1, 3, two shifted blocks in a row).  Windows of 2: the stage
    # maps of a 32 px crop (16, 8, 4, 2) are whole windows, so timm's export is exact there; 16 px local
    # crops pad stage 4 (1 x 1).  test_swin.py's reference uses windows of 4 (padded, single-window
    # stages).  iBOT grid 32 / 2 / 8 * 2 = 4.
    "swin": [
        "model.arch=swin", "model.swin.img_size=32", "model.swin.patch_size=2", "model.swin.embed_dim=16",
        "model.swin.depths=[2,2,4,2]", "model.swin.head_dim=4", "model.swin.window_size=2",
        "model.swin.min_width=8", "model.swin.width_step=4", "model.swin.min_depth=2",
        "data.digits_size=32", "data.global_size=32", "data.local_size=16",
    ],
    # Stage outputs 64/128/256/512, stage-1 mids 8/12/16 (x2 per stage) in 4 GroupNorm groups, depths
    # 1-3-4-1 elastic in stages 2 and 3 (2..3, 2..4); 32 px: final map 1x1, iBOT grid 4 (factor 4).  The
    # stem has timm's 64 channels so the timm export applies.
    "resnet": [
        "model.arch=resnet", "model.resnet.img_size=32", "model.resnet.stem_channels=64",
        "model.resnet.base_channels=16", "model.resnet.depths=[1,3,4,1]", "model.resnet.min_depths=[1,2,2,1]",
        "model.resnet.widths=[8,12,16]", "model.resnet.gn_groups=4", "model.resnet.ibot_scale_factor=4",
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




def resnet_rules(name: str):
    """(layer id, no weight decay) of a tiny-ResNet student parameter (depths 1-3-4-1: 9 blocks), by hand.

    The authors' get_resnet_lr_decay_rate: stem conv / norm and mask token 0, the blocks 1..9 in order
    (layer1.0 -> 1, layer2.0..2 -> 2..4, layer3.0..3 -> 5..8, layer4.0 -> 9), heads last with the
    last block (multiplier decay ** 0), i.e. num_layers = 8; no weight decay on every GroupNorm
    (bn1..bn3 and the shortcut's downsample.1); convolutions and the mask token keep it."""
    table = {"backbone.conv1.weight": (0, False), "backbone.bn1.weight": (0, True), "backbone.bn1.bias": (0, True),
             "backbone.mask_token": (0, False)}
    ids = {"layer1.0": 1, "layer2.0": 2, "layer2.1": 3, "layer2.2": 4, "layer3.0": 5, "layer3.1": 6, "layer3.2": 7,
           "layer3.3": 8, "layer4.0": 9}
    for block, i in ids.items():
        for p, no_wd in (("conv1.weight", False), ("bn1.weight", True), ("bn1.bias", True), ("conv2.weight", False),
                         ("bn2.weight", True), ("bn2.bias", True), ("conv3.weight", False), ("bn3.weight", True),
                         ("bn3.bias", True)):
            table[f"backbone.{block}.{p}"] = (i, no_wd)
        if block.endswith(".0"):  # every stage's first block has the projection shortcut (16 -> 64 in stage 1)
            table[f"backbone.{block}.downsample.0.weight"] = (i, False)
            table[f"backbone.{block}.downsample.1.weight"] = (i, True)
            table[f"backbone.{block}.downsample.1.bias"] = (i, True)
    if name.startswith("heads."):
        return 9, name.endswith(".bias")
    return table[name]


RULES = {"vit": vit_rules, "swin": swin_rules, "resnet": resnet_rules}
