"""Initialise an elastic backbone (and optionally its heads) from a dense checkpoint (``model.init_from``).

Formats (``model.init_from_format``; ``auto`` detects them from the file):

* ``poa``: a sub-network extracted by poa_hpc (``poa extract``: safetensors whose metadata names the
  family and the dense architecture), or a full poa_hpc checkpoint (``checkpoints/step_*.pt``: its
  teacher branch, heads included);
* ``timm``: a timm state dict (``.safetensors`` / ``.pth``) of a ViT, Swin or ResNet, what ``poa export
  --format timm`` writes and ``timm.create_model(...).state_dict()`` gives, timm's DINOv2 ViTs included.
  poa_hpc's backbones use timm's parameter names, so the names map one to one; a ViT without LayerScale
  gets LayerScales of 1, one without qkv bias zero biases (the same function);
* ``dinov2``: facebookresearch/dinov2's release files (``dinov2_vitl14_pretrain.pth``): the names are
  timm's too, plus ``mask_token`` (kept: it is iBOT's mask token) and, for ViT-g, chunked blocks
  ``blocks.C.N.*`` (flattened to ``blocks.N.*``);
* ``authors``: the authors' POA checkpoints (alipay/POA): the ``teacher`` state dict (``backbone.*``) of
  their elastic ViT (DINOv2's names), Swin (mmcv's layout; their patch merge's channel order is permuted to
  timm's) or ResNet (``DynamicResNet``), or one Swin sub-network written by their extractor; see
  :func:`_convert_authors`.

Refused with a one-line :class:`ConfigError`: register tokens (``register_tokens`` / ``reg_token``: the
elastic ViT has none), DINOv2's SwiGLU FFN (``mlp.w12``: the elastic MLP is fc1-GELU-fc2), BatchNorm
ResNets (poa_hpc's ResNet uses GroupNorm, as the authors), another patch size, another family, a file
larger than the recipe's intact network.

A file whose network is the intact network is copied as is.  A smaller one (any sub-network of the
elastic space, e.g. a ViT-B into an elastic ViT-L) initialises the slice that sub-network uses: its
first channels and its equal-interval blocks, with the elastic input scale divided out of every
projection, so the elastic forward of that sub-network equals the file's forward.  The rest of the
intact network keeps its random initialisation.  This is the exact inverse of extraction
(:meth:`BackboneSpec.extract_tensors`): it is computed from extraction itself (an index tensor run
through it), so it holds for every family without a second copy of the slicing rules.

Position embeddings of another grid are resized to the recipe's with the training resize
(``resize_pos_embed`` with ``interpolate_offset``).  The model layer only: the trainer calls
:func:`init_backbones` before step 0 of a run that does not resume.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from poa_hpc.errors import ConfigError
from poa_hpc.models.registry import backbone_names, get_backbone
from poa_hpc.models.subnets import Subnet

__all__ = ["FORMATS", "InitReport", "read_init_file", "convert", "init_backbones"]

FORMATS = ("auto", "poa", "timm", "dinov2", "authors")
KEY = "model.init_from"


@dataclass
class Converted:
    """A file read and converted to poa_hpc's dense names."""

    format: str  # detected or given format
    family: str
    backbone: Dict[str, torch.Tensor]  # dense backbone tensors, poa_hpc names
    heads: Optional[Dict[str, torch.Tensor]] = None  # head tensors (``0.mlp.0.weight`` ...), poa_hpc names
    arch: Any = None  # the dense architecture when the file records it (poa extracted files)
    unused: List[str] = field(default_factory=list)  # file keys that are not backbone or head tensors


@dataclass
class InitReport:
    path: str
    format: str
    family: str
    subnet: str  # the sub-network of the elastic space the file's network is
    intact: bool
    used: List[str]  # file keys copied into the backbone
    unused: List[str]  # file keys not used
    filled: Dict[str, str]  # backbone keys the file lacks, set to an equivalent default (LayerScale 1, bias 0)
    left: List[str]  # backbone keys the file does not set (keep their random initialisation)
    resized: Dict[str, List[List[int]]]  # key -> [file shape, recipe shape]
    heads: str  # "loaded" or why they are freshly initialised

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> str:
        s = (f"init_from {self.path} ({self.format}, {self.family}): sub-network {self.subnet}"
             f"{' (intact)' if self.intact else ''}; {len(self.used)} tensors used, {len(self.unused)} unused"
             f"{' (' + ', '.join(self.unused[:4]) + (', ...' if len(self.unused) > 4 else '') + ')' if self.unused else ''}"
             f", {len(self.left)} backbone tensors left at their initialisation"
             f"{' (' + ', '.join(self.left[:4]) + (', ...' if len(self.left) > 4 else '') + ')' if self.left else ''}")
        if self.filled:
            s += f", {len(self.filled)} filled ({', '.join(sorted(set(self.filled.values())))})"
        if self.resized:
            s += "; resized " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in self.resized.items())
        return s + f"; heads: {self.heads}"


# ---------------------------------------------------------------------------- reading
def read_init_file(path: str | Path) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """``(object, safetensors metadata)`` of ``path``: a safetensors file or a torch pickle (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"key '{KEY}': file '{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            return load_file(str(path)), meta
        except Exception as exc:
            raise ConfigError(f"key '{KEY}': '{path}' is not a readable safetensors file ({_one_line(exc)})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"key '{KEY}': '{path}' could not be read as a torch checkpoint of tensors "
                          f"({_one_line(exc)})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"key '{KEY}': '{path}' holds a {type(obj).__name__}, not a state dict")
    return obj, {}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _tensors(d: Dict[str, Any], prefix: str = "") -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in d.items() if isinstance(v, torch.Tensor) and k.startswith(prefix)}


def _strip(d: Dict[str, torch.Tensor], prefixes: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``module.``, ``_orig_mod.``, ``backbone.``) shared by every key."""
    changed = True
    while changed and d:
        changed = False
        for p in prefixes:
            if all(k.startswith(p) for k in d):
                d = {k[len(p):]: v for k, v in d.items()}
                changed = True
    return d


def family_of(keys: Sequence[str]) -> Optional[str]:
    """The family whose names ``keys`` use (timm's / poa_hpc's / DINOv2's names), or None."""
    ks = set(keys)
    if any(k.startswith("layers.") and ".attn.relative_position_bias_table" in k for k in ks):
        return "swin"
    if "conv1.weight" in ks and any(k.startswith("layer1.") for k in ks):
        return "resnet"
    if "patch_embed.proj.weight" in ks and any(k.startswith("blocks.") for k in ks):
        return "vit"
    return None


def detect_format(obj: Dict[str, Any], meta: Dict[str, str]) -> str:
    """``poa`` | ``timm`` | ``dinov2`` | ``authors`` | ``unknown`` from the file's structure and names."""
    if str(meta.get("format", "")).startswith("poa_hpc."):
        return "poa"
    if isinstance(obj.get("model"), dict) and "config" in obj and any(
            k.startswith("teacher.backbone.") for k in obj["model"]):
        return "poa"
    if isinstance(obj.get("teacher"), dict) or (isinstance(obj.get("model"), dict) and any(
            k.startswith("teacher.backbone.") for k in obj["model"])):
        return "authors"
    flat = _strip(_unwrap(obj), ("module.", "_orig_mod.", "backbone."))
    if family_of(list(flat)) is None and _authors_family(flat) != "vit":
        return "authors"  # one network extracted by their tools/extract_elastic_net.py (a flat backbone dict)
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in flat) or "register_tokens" in flat or any(
            ".mlp.w12." in k for k in flat) or ("mask_token" in flat and "ls1.gamma" in "".join(flat)):
        return "dinov2"
    if family_of(list(flat)) is not None:
        return "timm"
    return "unknown"


def _unwrap(obj: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """A plain state dict, or the one under ``state_dict`` / ``model`` / ``module`` / ``teacher``."""
    for k in ("state_dict", "model", "module", "teacher"):
        if isinstance(obj.get(k), dict) and not _tensors(obj):
            return _tensors(obj[k])
    return _tensors(obj)


def convert(obj: Dict[str, Any], meta: Dict[str, str], fmt: str, path: str) -> Converted:
    """The file's tensors under poa_hpc's names (``fmt`` ``auto`` detects it)."""
    if fmt not in FORMATS:
        raise ConfigError(f"key '{KEY}_format': {fmt!r} is not one of {list(FORMATS)}")
    detected = detect_format(obj, meta)
    fmt = detected if fmt == "auto" else fmt
    if fmt == "unknown":
        keys = list(_unwrap(obj))[:3]
        raise ConfigError(f"key '{KEY}': '{path}' is in no known format (not poa, timm, dinov2 or authors; "
                          f"keys such as {keys or list(obj)[:3]})")
    if fmt == "poa":
        return _convert_poa(obj, meta, path)
    if fmt == "authors":
        return _convert_authors(obj, path)
    flat = _strip(_unwrap(obj), ("module.", "_orig_mod.", "backbone."))
    if fmt == "dinov2":
        return _convert_dinov2(flat, path)
    return _convert_timm(flat, path)


def _family_or_error(keys, fmt: str, path: str) -> str:
    family = family_of(list(keys))
    if family is None:
        raise ConfigError(f"key '{KEY}': '{path}' (format {fmt}) has no ViT, Swin or ResNet backbone tensors "
                          f"(keys such as {list(keys)[:3]})")
    return family


def _split_heads(d: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    heads = {k[len("heads."):]: v for k, v in d.items() if k.startswith("heads.")}
    return {k: v for k, v in d.items() if not k.startswith("heads.")}, heads


def _convert_poa(obj, meta, path) -> Converted:
    if str(meta.get("format", "")).startswith("poa_hpc."):
        family = meta["format"][len("poa_hpc."):]
        if family not in backbone_names():
            raise ConfigError(f"key '{KEY}': '{path}' (format poa) is of an unknown family {family!r}")
        arch = get_backbone(family).config_cls(**json.loads(meta["arch"])) if "arch" in meta else None
        return Converted("poa", family, _tensors(obj), None, arch)
    state = obj.get("model") if isinstance(obj.get("model"), dict) else None
    if state is None:
        raise ConfigError(f"key '{KEY}': '{path}' (format poa) is neither an extracted sub-network nor a "
                          f"poa_hpc checkpoint (no 'model')")
    family = (obj.get("config") or {}).get("model", {}).get("arch") or family_of(_tensors(state, "teacher.backbone."))
    backbone = _tensors(state, "teacher.backbone.")
    if not backbone:
        raise ConfigError(f"key '{KEY}': '{path}' (format poa) has no teacher.backbone tensors")
    unused = sorted({"student.*" if k.startswith("student.") else k for k in state if not k.startswith("teacher.")})
    return Converted("poa", family, backbone, _tensors(state, "teacher.heads.") or None, None, unused)


def _convert_timm(flat, path) -> Converted:
    family = _family_or_error(flat, "timm", path)
    _refuse_common(flat, "timm", path)
    if family == "resnet" and any(k.endswith("running_mean") for k in flat):
        raise ConfigError(f"key '{KEY}': '{path}' (format timm) is a BatchNorm ResNet; poa_hpc's elastic ResNet "
                          f"uses GroupNorm (model.resnet.gn_groups, as the authors), whose features it cannot "
                          f"reproduce")
    return Converted("timm", family, dict(flat))


def _refuse_common(flat, fmt, path) -> None:
    if "reg_token" in flat or "register_tokens" in flat:
        n = (flat.get("reg_token") if "reg_token" in flat else flat["register_tokens"]).shape[1]
        raise ConfigError(f"key '{KEY}': '{path}' (format {fmt}) is a ViT with {n} register tokens; poa_hpc's "
                          f"elastic ViT has no register tokens (use a checkpoint without registers)")
    if any(".mlp.w12." in k for k in flat):
        raise ConfigError(f"key '{KEY}': '{path}' (format {fmt}) has SwiGLU MLPs (mlp.w12/w3, DINOv2 ViT-g); "
                          f"poa_hpc's elastic ViT MLP is fc1-GELU-fc2")


def _convert_dinov2(flat, path) -> Converted:
    """DINOv2's names are timm's: flatten chunked blocks ``blocks.C.N.`` (chunk C holds the blocks N of
    its range, after Identity padding, so N is the global block index) and refuse what does not exist here."""
    out = {}
    for k, v in flat.items():
        m = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", k)
        out[f"blocks.{m.group(2)}.{m.group(3)}" if m else k] = v
    if family_of(out) != "vit":
        raise ConfigError(f"key '{KEY}': '{path}' (format dinov2) is not a DINOv2 ViT (keys such as {list(out)[:3]})")
    _refuse_common(out, "dinov2", path)
    if "mask_token" in out and out["mask_token"].dim() == 1:
        out["mask_token"] = out["mask_token"][None]
    return Converted("dinov2", "vit", out)


# The authors' teacher (alipay/POA, ``SSLMetaArch.teacher``; ``teacher_checkpoint.pth`` holds
# ``{"teacher": teacher.state_dict()}``, their full checkpoints ``{"model": {"teacher.*", "student.*"}}``).
# ``dino_head`` / ``ibot_head`` (their MDINOHead) is not the layout of poa_hpc's heads and is never loaded.
# ``backbone`` is one of their elastic networks, mapped name by name (and, for the Swin patch merge, by a
# fixed permutation) onto poa_hpc's, which holds the same function (same slicing rules and input scales):
#
# * ViT (``DinoVisionTransformer``): DINOv2's names except that ``DynamicLinear`` wraps an ``nn.Linear`` as
#   ``.linear`` and ``DynamicLayerNorm`` an ``nn.LayerNorm`` as ``.norm`` (``blocks.0.attn.qkv.linear.weight``,
#   ``blocks.0.norm1.norm.weight``, ``norm.norm.weight``); the qkv weight is 3 row blocks q, k, v as timm's.
# * Swin (``DynamicSwinTransformer``, mmcv's layout): ``stages.S.blocks.J.{norm1,norm2}.norm``,
#   ``.attn.w_msa.{qkv,proj}.linear`` (qkv: ``GroupedDynamicLinear``, 3 row blocks q, k, v),
#   ``.attn.w_msa.relative_position_bias_table`` (and the ``relative_position_index`` buffer, checked and
#   dropped), ``.ffn.{fc1,fc2}.linear`` -> ``layers.S.blocks.J.{norm1,norm2,attn.qkv,attn.proj,
#   attn.relative_position_bias_table,mlp.fc1,mlp.fc2}``; the patch merge ``stages.S.downsample`` closes stage S
#   there and opens stage S + 1 here (``layers.S+1.downsample``); ``norm0..norm3`` are one LayerNorm per stage
#   output, of which only the last is in their forward (``norm``; the others serve their
#   ``get_intermediate_layers`` and are reported unused); ``patch_embed.norm.norm`` -> ``patch_embed.norm``.
#   Their merge concatenates the 2x2 neighbours through ``nn.Unfold``: input group ``p = 2 * dh + dw`` ((dh, dw)
#   the offset in the 2x2 window), then ``p * C + c``; timm's (and poa_hpc's) concatenation is
#   ``q = 2 * dw + dh``.  So the merge's LayerNorm entries and reduction columns are 4 groups of C reordered
#   (0, 2, 1, 3) (the permutation is its own inverse).  Elastic widths keep the first c of each group in both.
# * ResNet (``DynamicResNet``): ``conv1`` / ``norm1`` (stem) -> ``conv1`` / ``bn1``;
#   ``layerS.layers.J.conv{1,2,3}.conv.weight`` (``DynamicConv2d`` wraps an ``nn.Conv2d`` as ``.conv``) ->
#   ``layerS.J.conv{1,2,3}.weight``, ``layerS.layers.J.norm{1,2,3}`` (``DynamicGroupNorm``) ->
#   ``layerS.J.bn{1,2,3}``, ``layerS.layers.0.downsample.{0,1}`` (conv, GroupNorm) as is.  Their ``avg_down``
#   shortcut (an average pool before the conv: ``downsample.{1,2}``) computes another function: refused.
# Their extractor (``tools/extract_elastic_net.py``) writes one sub-network of the Swin as a flat dict under the
# same names (``backbone.*``, sliced, input scales folded in, the patch-embed LayerNorm sliced as here): it maps
# the same way, onto that sub-network.
def _authors_name(k: str) -> str:
    k = re.sub(r"\.linear\.(weight|bias)$", r".\1", k)
    return re.sub(r"(^|\.)(norm\d?)\.norm\.(weight|bias)$", r"\1\2.\3", k)


#: the authors' merge group of each poa_hpc (timm) merge group: q = 2 * dw + dh takes p = 2 * dh + dw
MERGE_GROUPS = (0, 2, 1, 3)


def authors_merge_to_timm(t: torch.Tensor) -> torch.Tensor:
    """The authors' patch-merge LayerNorm entries / reduction columns (last dim: 4 groups in their Unfold
    order) in timm's concatenation order."""
    g = t.chunk(4, dim=-1)
    return torch.cat([g[p] for p in MERGE_GROUPS], dim=-1)


def _authors_family(keys) -> str:
    if any(re.match(r"stages\.\d+\.blocks\.\d+\.attn\.w_msa\.", k) for k in keys):
        return "swin"
    if any(re.match(r"layer\d+\.layers\.\d+\.", k) for k in keys):
        return "resnet"
    return "vit"


def _authors_swin(backbone: Dict[str, torch.Tensor], path: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    from poa_hpc.models.swin.model import relative_position_index

    stages = 1 + max(int(m.group(1)) for k in backbone if (m := re.match(r"stages\.(\d+)\.", k)))
    out: Dict[str, torch.Tensor] = {}
    unused: List[str] = []
    for k, v in backbone.items():
        if m := re.match(r"stages\.(\d+)\.downsample\.(norm\.norm|reduction\.linear)\.(weight|bias)$", k):
            part = "norm" if m.group(2) == "norm.norm" else "reduction"
            out[f"layers.{int(m.group(1)) + 1}.downsample.{part}.{m.group(3)}"] = authors_merge_to_timm(v)
        elif m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)$", k):
            rest = m.group(3)
            if rest == "attn.w_msa.relative_position_index":
                window = int(round(math.sqrt(v.shape[0])))
                if not torch.equal(v.long().cpu(), relative_position_index(window)):
                    raise ConfigError(f"key '{KEY}': '{path}' (format authors): {k} is not the Swin relative "
                                      f"position index of {window}x{window} windows")
                continue
            rest = rest.replace("attn.w_msa.", "attn.").replace("ffn.", "mlp.")
            out[f"layers.{m.group(1)}.blocks.{m.group(2)}.{_authors_name(rest)}"] = v
        elif m := re.match(r"norm(\d+)\.norm\.(weight|bias)$", k):
            if int(m.group(1)) == stages - 1:
                out[f"norm.{m.group(2)}"] = v
            else:
                unused.append(k)
        else:  # patch_embed.proj.*, patch_embed.norm.norm.*, mask_token
            out[_authors_name(k)] = v
    return out, unused


def _authors_resnet(backbone: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for k, v in backbone.items():
        if m := re.match(r"(layer\d+)\.layers\.(\d+)\.(.*)$", k):
            rest = m.group(3)
            if rest.startswith("downsample.2."):
                raise ConfigError(f"key '{KEY}': '{path}' (format authors) is a ResNet with avg_down shortcuts "
                                  f"({k}); poa_hpc's ResNet has strided 1x1 conv shortcuts")
            rest = re.sub(r"^conv(\d)\.conv\.", r"conv\1.", rest)
            rest = re.sub(r"^norm(\d)\.", r"bn\1.", rest)
            out[f"{m.group(1)}.{m.group(2)}.{rest}"] = v
        else:  # conv1.weight, norm1.* (the stem), mask_token
            out[re.sub(r"^norm1\.", "bn1.", k)] = v
    return out


def _convert_authors(obj, path) -> Converted:
    outside: set = set()
    model = obj.get("model") if isinstance(obj.get("model"), dict) else {}
    if isinstance(obj.get("teacher"), dict):
        teacher = _tensors(obj["teacher"])
    elif any(k.startswith("teacher.") for k in model):
        teacher = _tensors(model, "teacher.")
        outside = {"student.*" if k.startswith("student.") else k for k in model if not k.startswith("teacher.")}
    else:  # one network extracted by their tools/extract_elastic_net.py: the backbone's tensors alone
        teacher = {"backbone." + k: v for k, v in _strip(_unwrap(obj), ("module.", "_orig_mod.", "backbone.")).items()}
    backbone = _strip(_tensors(teacher, "backbone."), ("module.",))
    if not backbone:
        raise ConfigError(f"key '{KEY}': '{path}' (format authors) has no teacher 'backbone.*' tensors "
                          f"(keys such as {list(teacher)[:3]})")
    unused = sorted({k for k in teacher if not k.startswith("backbone.")} | outside)
    family = _authors_family(backbone)
    if family == "swin":
        flat, more = _authors_swin(backbone, path)
        unused = sorted(unused + ["backbone." + k for k in more])
    elif family == "resnet":
        flat = _authors_resnet(backbone, path)
    else:
        flat = {}
        for k, v in backbone.items():
            m = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", k)
            flat[_authors_name(f"blocks.{m.group(2)}.{m.group(3)}" if m else k)] = v
    if family_of(flat) != family:
        raise ConfigError(f"key '{KEY}': '{path}' (format authors) is not one of the authors' ViT, Swin or ResNet "
                          f"backbones (keys such as {list(backbone)[:3]})")
    _refuse_common(flat, "authors", path)
    return Converted("authors", family, flat, None, None, unused)


# ---------------------------------------------------------------------------- mapping
# Backbone keys a file may lack, with the value that gives the same function.
_DEFAULTS = ((re.compile(r".*\.ls[12]\.gamma$"), 1.0, "LayerScale 1 (the file has none)"),
             (re.compile(r".*\.attn\.qkv\.bias$"), 0.0, "qkv bias 0 (the file has none)"))
_LEFT_OK = ("mask_token",)  # never required (timm files have none); left at its initialisation


def _default_for(key: str):
    for pat, value, why in _DEFAULTS:
        if pat.match(key):
            return value, why
    return None


def _check_patch(family: str, arch: Any, state: Dict[str, torch.Tensor], path: str, fmt: str) -> None:
    w = state.get("patch_embed.proj.weight")
    if family in ("vit", "swin") and w is not None and w.dim() == 4 and tuple(w.shape[-2:]) != (arch.patch_size,) * 2:
        raise ConfigError(f"key 'model.{family}.patch_size': {arch.patch_size}, but '{path}' (format {fmt}) has "
                          f"patch size {w.shape[-1]}; set model.{family}.patch_size={w.shape[-1]} (and crop sizes "
                          f"that are multiples of it)")


def _resize_pos(state, arch, elastic_shape, resized) -> None:
    pos = state.get("pos_embed")
    if pos is None or pos.dim() != 3 or pos.shape[1] == elastic_shape[1]:
        return
    from poa_hpc.models.vit.model import resize_pos_embed

    n = pos.shape[1] - 1
    grid = int(round(math.sqrt(n)))
    if grid * grid != n:
        return  # not [CLS] + a square grid (e.g. no class position): reported as a shape mismatch
    g = arch.img_size // arch.patch_size
    new = resize_pos_embed(pos.float(), g, g, arch.interpolate_offset).to(pos.dtype)
    resized["pos_embed"] = [list(pos.shape), list(new.shape)]
    state["pos_embed"] = new


def _find_subnet(spec, arch, meta_sd: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]):
    """The sub-network whose extracted tensors have the file's shapes: ``(sub, names->shapes)`` or None.
    The intact network is tried first."""
    space = spec.space(arch)
    subs = [space.intact] + [Subnet(w, d) for w in reversed(space.widths) for d in reversed(space.depths)
                             if Subnet(w, d) != space.intact]
    for sub in subs:
        _, out = spec.extract_tensors(meta_sd, arch, sub)
        ok = True
        for k, t in out.items():
            if k in state:
                if tuple(state[k].shape) != tuple(t.shape):
                    ok = False
                    break
            elif k not in _LEFT_OK and _default_for(k) is None:
                ok = False
                break
        if ok:
            return sub, {k: tuple(t.shape) for k, t in out.items()}
    return None


def _mismatch_detail(state, elastic_sd, limit: int = 3) -> str:
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in elastic_sd.items()
           if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in elastic_sd if k not in state and k not in _LEFT_OK and _default_for(k) is None]
    parts = []
    if bad:
        parts.append("file vs intact shapes: " + "; ".join(bad[:limit]) + (" ..." if len(bad) > limit else ""))
    if missing:
        parts.append(f"{len(missing)} tensors missing, e.g. " + ", ".join(missing[:limit]))
    return "; ".join(parts) or "no tensor in common"


@torch.no_grad()
def _inverse_extract(spec, arch, sub, elastic_sd: Dict[str, torch.Tensor], dense: Dict[str, torch.Tensor]):
    """Elastic tensors (name -> (flat index, values)) such that extracting ``sub`` gives ``dense``.

    Extraction slices and scales (``dense = c * elastic[index]``); running it on a float64 tensor of
    global element indices and on ones gives every dense element's source index and scale ``c``."""
    names = list(elastic_sd)
    offsets, total = {}, 0
    for k in names:
        offsets[k] = total
        total += elastic_sd[k].numel()
    if total >= 2 ** 52:
        raise ConfigError(f"key '{KEY}': the network is too large to map a sub-network into")
    idx_sd = {k: (torch.arange(elastic_sd[k].numel(), dtype=torch.float64) + offsets[k]).reshape(elastic_sd[k].shape)
              for k in names}
    one_sd = {k: torch.ones(elastic_sd[k].shape, dtype=torch.float64) for k in names}
    _, idx_out = spec.extract_tensors(idx_sd, arch, sub)
    _, one_out = spec.extract_tensors(one_sd, arch, sub)
    del idx_sd, one_sd
    starts = torch.tensor([offsets[k] for k in names], dtype=torch.float64)
    writes: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for k, val in dense.items():
        scale = one_out[k].flatten()
        pos = torch.round(idx_out[k].flatten() / scale).long()
        owner = torch.searchsorted(starts.long(), pos, right=True) - 1
        if owner.min() != owner.max():
            raise RuntimeError(f"dense tensor {k} is gathered from several elastic tensors")
        name = names[int(owner[0])]
        local = pos - offsets[name]
        values = val.flatten().double() / scale
        writes[name] = (local, values) if name not in writes else (
            torch.cat([writes[name][0], local]), torch.cat([writes[name][1], values]))
    return writes


def _build_state(spec, arch, conv: Converted, elastic_sd: Dict[str, torch.Tensor], path: str):
    """(new backbone tensors, report fields) for loading ``conv`` into a backbone whose state is ``elastic_sd``."""
    family = conv.family
    state = dict(conv.backbone)
    resized: Dict[str, List[List[int]]] = {}
    _check_patch(family, arch, state, path, conv.format)
    if family == "vit" and "pos_embed" in elastic_sd:
        _resize_pos(state, arch, elastic_sd["pos_embed"].shape, resized)
    if conv.arch is not None and family in ("vit", "swin") and getattr(conv.arch, "head_dim", None) not in (
            None, arch.head_dim):
        raise ConfigError(f"key 'model.{family}': '{path}' (format {conv.format}) has head dim "
                          f"{conv.arch.head_dim}, the recipe {arch.head_dim}")
    meta_sd = {k: torch.empty(v.shape, device="meta") for k, v in elastic_sd.items()}
    found = _find_subnet(spec, arch, meta_sd, state)
    if found is None:
        used = [k for k in state if k in elastic_sd]
        if not used:
            raise ConfigError(f"key '{KEY}': no tensor of '{path}' (format {conv.format}, {family}) maps to the "
                              f"elastic {family} (file keys such as {list(state)[:3]})")
        raise ConfigError(f"key '{KEY}': the {family} of '{path}' (format {conv.format}) is neither the recipe's "
                          f"intact network nor one of its sub-networks ({_mismatch_detail(state, elastic_sd)}); "
                          f"a larger file is never cropped")
    sub, shapes = found
    intact = sub == spec.space(arch).intact
    if family == "swin" and not intact and sub.depth != spec.space(arch).intact.depth:
        file_shift = None if conv.arch is None else conv.arch.shifts(2)
        if file_shift != arch.sub(sub.width, sub.depth).shifts(2):
            raise ConfigError(f"key '{KEY}': the Swin of '{path}' has {sub.depth} stage-3 blocks, the recipe "
                              f"{spec.space(arch).intact.depth}: its blocks' window shifts alternate, those of the "
                              f"elastic sub-network do not, so its features cannot be kept; use a file of the "
                              f"recipe's depths")
    filled: Dict[str, str] = {}
    dense: Dict[str, torch.Tensor] = {}
    for k, shape in shapes.items():
        if k in state:
            dense[k] = state[k].float()
        elif (d := _default_for(k)) is not None:
            dense[k] = torch.full(shape, d[0])
            filled[k] = d[1]
    used = sorted(k for k in state if k in shapes)
    unused = sorted(set(state) - set(used))
    new: Dict[str, torch.Tensor] = {}
    if intact and set(dense) <= set(elastic_sd):
        for k, v in dense.items():
            new[k] = v.reshape(elastic_sd[k].shape)
    else:
        writes = _inverse_extract(spec, arch, sub, elastic_sd, dense)
        for name, (local, values) in writes.items():
            t = elastic_sd[name].detach().to("cpu", torch.float64).clone().flatten()
            t[local] = values
            new[name] = t.reshape(elastic_sd[name].shape).float()
    partly = []
    if not intact:
        partly = sorted(n for n, (local, _) in writes.items() if local.unique().numel() < elastic_sd[n].numel())
    left = sorted(k for k in elastic_sd if k not in new) + [f"{k} (partly: outside the sub-network)" for k in partly]
    return new, sub, intact, used, unused, filled, left, resized


@torch.no_grad()
def init_backbones(path: str | Path, fmt: str, family: str, arch: Any, backbones: Sequence[torch.nn.Module],
                   heads: Sequence[torch.nn.Module] = (), init_heads: bool = False) -> InitReport:
    """Load the dense network of ``path`` into each of ``backbones`` (the intact student's and the teacher's,
    which share one architecture ``arch`` of ``family``) and, with ``init_heads``, the file's heads into
    ``heads`` when they have the same names and shapes.  Raises :class:`ConfigError` (exit 2, one line)."""
    path = str(path)
    obj, meta = read_init_file(path)
    conv = convert(obj, meta, fmt, path)
    if conv.family != family:
        raise ConfigError(f"key 'model.arch': {family!r}, but '{path}' (format {conv.format}) holds a "
                          f"{conv.family}; set model.arch={conv.family}")
    spec = get_backbone(family)
    elastic_sd = backbones[0].state_dict()
    new, sub, intact, used, unused, filled, left, resized = _build_state(spec, arch, conv, elastic_sd, path)
    for b in backbones:
        sd = b.state_dict()
        for k, v in new.items():
            sd[k].copy_(v.to(sd[k].dtype))
    head_status = "fresh (model.init_heads is false)"
    if conv.heads and init_heads:
        want = heads[0].state_dict() if heads else {}
        bad = [k for k in want if k not in conv.heads or tuple(conv.heads[k].shape) != tuple(want[k].shape)]
        if bad or set(conv.heads) - set(want):
            head_status = f"fresh (the file's heads do not match head.*: e.g. {(bad or sorted(set(conv.heads) - set(want)))[0]})"
        else:
            for h in heads:
                sd = h.state_dict()
                for k, v in conv.heads.items():
                    sd[k].copy_(v.to(sd[k].dtype))
            head_status = "loaded"
    elif init_heads:
        head_status = "fresh (the file has no heads)"
    elif conv.heads:
        head_status = "fresh (the file has heads; model.init_heads=true loads them)"
    unused = sorted(set(unused) | set(conv.unused) | ({"heads.*"} if conv.heads and head_status != "loaded" else set()))
    return InitReport(path, conv.format, family, str(sub), intact, used, unused, filled, left, resized, head_status)
