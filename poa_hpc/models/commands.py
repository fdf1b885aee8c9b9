"""``poa extract``, ``poa export`` and ``poa subnets``: dense sub-networks out of a trained elastic backbone.

The bodies are functions (:func:`export_items`, :func:`write_export`) so another output format is one more
branch of :func:`write_export` and one more ``--format`` choice."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from poa_hpc.commands import register_command
from poa_hpc.errors import UsageError

EXPORT_FORMATS = ("timm", "safetensors", "onnx")


def add_subnet_arguments(p: argparse.ArgumentParser, subnet_help: str) -> None:
    p.add_argument("--width", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--subnet", action="append", help=subnet_help)
    p.add_argument("--all", action="store_true", help="every sub-network of the elastic space")


def subnets_from_args(args: argparse.Namespace, space, named=None) -> List:
    """The sub-networks named by ``--all`` / ``--subnet WxD|NAME`` / ``--width W --depth D``, checked."""
    from poa_hpc.models.subnets import Subnet

    if args.all:
        return space.all()
    try:
        subs = [sub for s in (args.subnet or []) for sub in space.resolve(s, named)]
    except ValueError as exc:
        raise UsageError(f"--subnet {exc}") from None
    if args.width is not None or args.depth is not None:
        if args.width is None or args.depth is None:
            raise UsageError("--width and --depth go together")
        subs.append(Subnet(args.width, args.depth))
    if not subs:
        raise UsageError("name the sub-networks: --width W --depth D, --subnet WxD (repeatable) or --all")
    for s in subs:
        try:
            space.check(s)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return subs


@register_command("extract")
class ExtractCommand:
    """write dense sub-networks from a checkpoint's teacher"""

    @staticmethod
    def add_arguments(e: argparse.ArgumentParser) -> None:
        e.add_argument("checkpoint", help="training checkpoint (file, or run folder with checkpoints/last.pt)")
        e.add_argument("--step", type=int, default=None,
                       help="a kept checkpoint of a run folder (checkpoints/step_XXXXXXXX.pt) instead of the newest")
        add_subnet_arguments(e, "WIDTHxDEPTH (384x12; per-stage depths 64x3-4-6-3) or a named size (ViT-S), "
                                "repeatable")
        e.add_argument("--branch", choices=("teacher", "student"), default="teacher")
        e.add_argument("-o", "--output", required=True, help=".safetensors file (one sub-network) or folder")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from poa_hpc.config import to_dict
        from poa_hpc.models.extract import extract_to
        from poa_hpc.models.registry import get_backbone
        from poa_hpc.train.load import load_teacher

        cfg, backbone, step = load_teacher(args.checkpoint, args.branch, args.step)
        spec = get_backbone(cfg.model.arch)
        subs = subnets_from_args(args, spec.space(cfg.model.section), spec.named_sizes(cfg.model.section))
        out = Path(args.output)
        single = len(subs) == 1 and out.suffix == ".safetensors"
        if not single and out.suffix == ".safetensors":
            raise UsageError(f"-o {out}: several sub-networks need an output folder, not a .safetensors file")
        source = f"{args.checkpoint}:{args.branch}" + (f"@step{args.step}" if args.step is not None else "")
        for p in extract_to(backbone, subs, out, single, step, source, to_dict(cfg)):
            print(p)
        return 0


def export_items(args: argparse.Namespace) -> list:
    """``[(family, dense arch, tensors, sub-network, provenance)]`` of what ``poa export`` writes: the one
    sub-network of an extracted file, or the selected sub-networks of a run or checkpoint."""
    from poa_hpc.config import to_dict
    from poa_hpc.models.extract import extract_state_dict, read_subnet
    from poa_hpc.models.registry import get_backbone
    from poa_hpc.train.load import load_teacher

    src = Path(args.source)
    items = []
    if src.suffix == ".safetensors":
        if args.subnet or args.all or args.width is not None or args.depth is not None:
            raise UsageError(f"'{src}' holds one extracted sub-network; --subnet/--all/--width/--depth select "
                             "sub-networks of a run or checkpoint")
        try:
            family, arch, state, meta = read_subnet(src)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        sub = get_backbone(family).space(arch).intact
        items.append((family, arch, state, sub, {"source": str(src), "step": meta.get("step"),
                                                 "run": meta.get("source"), "config": meta.get("config")}))
    else:
        cfg, backbone, step = load_teacher(args.source, args.branch)
        spec = get_backbone(cfg.model.arch)
        for sub in subnets_from_args(args, spec.space(cfg.model.section), spec.named_sizes(cfg.model.section)):
            arch, state = extract_state_dict(backbone, sub)
            items.append((cfg.model.arch, arch, state, sub, {"source": f"{args.source}:{args.branch}", "step": step,
                                                            "run": str(src), "config": to_dict(cfg)}))
    return items


def write_export(fmt: str, out: Path, family: str, arch, state, sub, prov: dict, img_size=None) -> str:
    """Write one sub-network in ``fmt``; the line ``poa export`` prints for it."""
    from poa_hpc.models.extract import export_timm, save_subnet

    stem = out / f"{family}_{sub}"
    if fmt == "safetensors":
        return str(save_subnet(stem.with_suffix(".safetensors"), family, arch, state, width=sub.width,
                               depth=sub.depth, step=prov["step"], source=prov["source"], config=prov["config"]))
    if fmt == "onnx":
        from poa_hpc.models.onnx_export import export_onnx
        from poa_hpc.models.registry import get_backbone

        dense = get_backbone(family).build_dense(arch)
        dense.load_state_dict(state)
        size = img_size or getattr(arch, "img_size", None) or 224
        diff = export_onnx(dense, size, stem.with_suffix(".onnx"))
        return f"{stem.with_suffix('.onnx')}  (input {size} px, onnxruntime vs PyTorch max abs diff {diff:.2e})"
    try:
        weights, info = export_timm(stem, family, arch, state, img_size=img_size, run=prov["run"],
                                    step=prov["step"], width=sub.width, depth=sub.depth)
    except (NotImplementedError, ValueError) as exc:
        raise UsageError(f"--format timm: {exc}") from None
    return f"{weights}  {info}"


@register_command("export")
class ExportCommand:
    """write sub-networks as timm models (safetensors + JSON), ONNX or poa_hpc files"""

    @staticmethod
    def add_arguments(x: argparse.ArgumentParser) -> None:
        x.add_argument("source", help="run folder / training checkpoint, or one extracted .safetensors file")
        x.add_argument("--format", choices=EXPORT_FORMATS, default="timm",
                       help="timm: state dict + JSON for timm.create_model; safetensors: poa_hpc files "
                            "(as poa extract); onnx: opset 18, dynamic batch, checked against PyTorch with onnxruntime")
        add_subnet_arguments(x, "WIDTHxDEPTH or a named size (ViT-S), repeatable")
        x.add_argument("--img-size", type=int, help="input size the timm model is built for (default: the native size)")
        x.add_argument("--branch", choices=("teacher", "student"), default="teacher")
        x.add_argument("-o", "--output", required=True, help="output folder")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Sub-networks of a run (or one extracted file) as timm models or poa_hpc safetensors files."""
        out = Path(args.output)
        for family, arch, state, sub, prov in export_items(args):
            print(write_export(args.format, out, family, arch, state, sub, prov, img_size=args.img_size))
        return 0


@register_command("subnets")
class SubnetsCommand:
    """list the elastic sub-networks and their sampling probabilities"""

    @staticmethod
    def add_arguments(s: argparse.ArgumentParser) -> None:
        s.add_argument("--config", required=True)
        s.add_argument("overrides", nargs="*")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from poa_hpc.config import load_config
        from poa_hpc.models.registry import get_backbone
        from poa_hpc.models.subnets import depth_str

        cfg = load_config(args.config, args.overrides)
        spec, arch = get_backbone(cfg.model.arch), cfg.model.section
        space = spec.space(arch)
        probs = space.probabilities()
        names = {sub: name for name, sub in spec.named_sizes(arch).items()}
        depths = [depth_str(d) for d in space.depths]
        shown = depths if len(depths) <= 16 else depths[:4] + ["..."] + depths[-2:]
        print(f"{cfg.model.arch}: {len(space)} sub-networks: widths {list(space.widths)}, "
              f"{len(depths)} depths {', '.join(shown)}; pool of {sum(space.weights().values())} (eq. 14, s={space.s})")
        print(f"{'sub-network':<16}{'name':<8}{'params(M)':>11}{'GFLOPs':>9}{'p(sample)':>11}")
        for sub in space.all():
            p = probs.get(sub)
            print(f"{str(sub):<16}{names.get(sub, ''):<8}{spec.params(arch, sub) / 1e6:>11.2f}"
                  f"{spec.gflops(arch, sub):>9.2f}{(f'{p:.4f}' if p else 'intact'):>11}")
        return 0
