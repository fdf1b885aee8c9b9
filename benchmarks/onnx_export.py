"""ONNX export of real-size named sub-networks (ViT-S of ViT-L, Swin-T of Swin-B, R50 of the elastic
ResNet) at 224 px: onnxruntime vs PyTorch, max abs and relative difference, and export time.

    python benchmarks/onnx_export.py [--names ViT-S,Swin-T,R50]

Weights are the freshly initialised teacher's (the check is about the graph, not the training).
Prints a table and writes benchmarks/results/onnx_export_<device>_<time>.json."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

CONFIGS = {"vit": "configs/vit_l_poa.yaml", "swin": "configs/swin_poa.yaml", "resnet": "configs/resnet_poa.yaml"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", default="ViT-S,Swin-T,R50")
    args = ap.parse_args()
    import onnx
    import onnxruntime

    from poa_hpc.config import load_config
    from poa_hpc.models.extract import extract_state_dict
    from poa_hpc.models.onnx_export import OPSET, export_onnx, onnx_session
    from poa_hpc.models.registry import get_backbone
    from poa_hpc.train.meta_arch import build_branch

    want = [n.strip() for n in args.names.split(",")]
    rows = []
    out_dir = Path("benchmarks/results")
    for family, path in CONFIGS.items():
        cfg = load_config(path, [])
        spec, arch = get_backbone(family), cfg.model.section
        named = {n: s for n, s in spec.named_sizes(arch).items() if n in want}
        if not named:
            continue
        torch.manual_seed(0)
        backbone = build_branch(cfg, 0.0).backbone.eval()
        for name, sub in named.items():
            dense_arch, state = extract_state_dict(backbone, sub)
            model = spec.build_dense(dense_arch)
            model.load_state_dict(state)
            size = 224
            f = Path(f"/tmp/poa_onnx_bench_{family}_{sub}.onnx")
            t0 = time.perf_counter()
            diff = export_onnx(model, size, f)
            seconds = time.perf_counter() - t0
            x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                ref = model(x)
            got = torch.from_numpy(onnx_session(f).run(None, {"images": x.numpy()})[0])
            d4 = float((got - ref).abs().max())
            rel = d4 / float(ref.abs().max())
            rows.append({"name": name, "family": family, "subnet": str(sub), "img_size": size,
                         "params_m": spec.params(arch, sub) / 1e6, "max_abs_diff_batch2": diff,
                         "max_abs_diff_batch4": d4, "max_rel_diff_batch4": rel, "within_1e-4_rel": rel <= 1e-4,
                         "export_seconds": round(seconds, 1), "onnx_mb": round(f.stat().st_size / 2 ** 20, 1)})
            f.unlink()
            print(f"{name:<8}{str(sub):<18}{rows[-1]['params_m']:>8.1f} M  max abs diff {d4:.2e}  rel {rel:.2e}  "
                  f"export {seconds:.0f} s", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    doc = {"benchmark": "onnx_export", "rows": rows, "opset": OPSET, "device": "cpu",
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__, "commit": commit,
           "note": "onnxruntime CPU vs PyTorch eager CPU on random N(0,1) inputs; freshly initialised weights"}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"onnx_export_cpu_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
