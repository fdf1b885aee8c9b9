"""FLOPs of a POA step counted on meta tensors against a formula written out here from the ViT's shapes;
the eq. 14 expectation and its per-rank maximum against brute force; the CLI."""

import itertools
import json

import pytest

from poa_hpc.cli import main
from poa_hpc.config import load_config
from poa_hpc.models.subnets import Subnet
from poa_hpc.perf.flops import analytic_step_flops, count_step, elastic_counter, expected_step

# ViT-L/16 shapes (width 1024, 16 heads, 224/96 px crops) at depth 4 and a small batch: the op count, which is
# what costs time on meta tensors, stays small; the shapes stay the real ones.
VIT_L_SHAPES = [
    "model.vit.depth=4", "model.vit.min_depth=2", "model.vit.min_width=768", "optim.batch_size=4", "data.n_local=2",
    "head.prototypes=[8192,65536]", "loss.chunk_elements=0",
]


def vit_step_flops(cfg, sub, M):
    """Matmul FLOPs (2 per multiply-add) of one POA step, from the ViT's shapes, written out independently.

    Backbone per image and block at width w over N tokens: qkv + proj + fc1 + fc2 = 12 N w^2 multiply-adds,
    attention scores and mixing 2 N^2 w; backward: 2x for the projections, 2.5x for attention (flash
    recomputes the scores); the patch convolution runs at full width and its backward computes the weight
    gradient only.  Heads: 3-layer MLP then prototypes per row; Sinkhorn-Knopp and the chunked losses form
    the logits once per pass; KoLeo one x x^T per global view.  The students' blocks under subset stochastic
    depth (DINOv2: model.drop_path_mode subset, or auto above rate 0.1) run on max(int(b (1 - rate)), 1) of
    the b crops of each backbone call (the 2B global crops, the n_local B local crops)."""
    a, h, lc, d = cfg.model.vit, cfg.head, cfg.loss, cfg.data
    B, L, D, p = cfg.optim.batch_size, a.depth, a.embed_dim, a.patch_size
    n_local = d.n_local
    ids = lambda depth: depth  # blocks that run: every one of the sub-network's depth

    rate, mode = a.drop_path_rate, cfg.model.drop_path_mode
    subset = rate > 0 and (mode == "subset" or (mode == "auto" and rate > 0.1))

    def image(size, w, depth, backward, keep=1.0):
        n = (size // p) ** 2
        N = n + 1
        conv = 2 * n * 3 * p * p * D
        proj = 2 * 12 * N * w * w
        attn = 2 * 2 * N * N * w
        if not backward:
            return conv + depth * (proj + attn) * keep
        return 2 * conv + depth * (3 * proj + 3.5 * attn) * keep

    def backbone(w, depth, backward, local=True):
        keep = (lambda b: max(int(b * (1 - rate)), 1) / b) if backward and subset else (lambda b: 1.0)
        f = 2 * B * image(d.global_size, w, depth, backward, keep(2 * B))
        if local:
            f += n_local * B * image(d.local_size, w, depth, backward, keep(n_local * B))
        return f

    def mlp(in_dim):
        return 2 * (in_dim * h.hidden_dim + h.hidden_dim * h.hidden_dim + h.hidden_dim * h.bottleneck_dim)

    proto = lambda k: 2 * h.bottleneck_dim * k
    it = lc.sinkhorn_iters
    g_rows, l_rows = 2 * B, n_local * B
    teacher = backbone(D, L, False, local=False)
    for k in h.prototypes:
        teacher += (g_rows + M) * (mlp(D) + proto(k))  # heads forward
        teacher += (g_rows * (2 + it) + M * (1 + it)) * proto(k)  # Sinkhorn-Knopp passes
    total = teacher
    for w, depth, sv in ((D, L, False), (sub.width, ids(sub.depth), True)):
        rows = g_rows + l_rows + M
        total += backbone(w, depth, True)
        for k in h.prototypes:
            total += 3 * rows * (mlp(w) + proto(k)) + M * proto(k) + (g_rows + l_rows) * proto(k) * sv
        total += 3 * 2 * (2 * B * B * w)  # KoLeo: x x^T per global view (B x B x w), forward + backward
    return total


def vit_l_cfg(*overrides):
    return load_config("configs/vit_l_poa.yaml", VIT_L_SHAPES + list(overrides))


@pytest.mark.parametrize("ibot,mode", [(True, "auto"), (False, "auto"), (True, "mask")])
def test_counted_step_flops_match_the_formula(ibot, mode):
    # vit_l_poa.yaml runs its students' blocks on subsets (drop_path_mode auto at rate 0.2); mask runs them whole
    cfg = vit_l_cfg(f"model.drop_path_mode={mode}")
    assert cfg.model.vit.drop_path_rate == 0.2 and load_config("configs/vit_l_poa.yaml").model.drop_path_mode == "auto"
    sub, M = Subnet(832, 3), 37
    counted = count_step(cfg, sub, n_masked=M, ibot=ibot)
    expect = vit_step_flops(cfg, sub, M if ibot else 0)
    assert counted.step == pytest.approx(expect, rel=0.02)
    # the product's own analytic model (the trainer's tflops) too, part by part where it is exact
    an = analytic_step_flops(cfg, sub, M, ibot)
    assert sum(an.values()) == pytest.approx(counted.step, rel=0.02)
    for part in ("teacher/backbone", "teacher/heads", "teacher/sinkhorn"):
        assert counted.parts[part]["matmul"] == pytest.approx(an[part], rel=1e-9), part
    for part in ("intact/backbone", "elastic/backbone"):  # the students' subset discount, branch by branch
        assert counted.parts[part]["matmul"] == pytest.approx(an[part], rel=0.02), part
    assert counted.parts["optimizer/clip_adamw"]["matmul"] == 0 and counted.parts["optimizer/clip_adamw"]["elementwise"]
    assert counted.parts["ema/update"]["elementwise"] > 0


def test_depth_interpolation_and_per_rank_maximum():
    """Interpolated elastic FLOPs equal counting every sub-network (ViT blocks are alike); E[max over R ranks]
    equals brute force over all R-tuples of draws."""
    cfg = load_config("configs/demo_cpu.yaml", ["optim.batch_size=2", "data.n_local=1", "model.vit.min_width=64",
                                                "loss.chunk_elements=0"])
    exp = expected_step(cfg, world_size=3)
    count = elastic_counter(cfg, n_masked=exp["n_masked"])
    space = exp["base"].sub  # (the smallest)
    assert space == Subnet(64, 3)
    for sub, f in exp["elastic"].items():
        assert f == count(sub), sub
    from poa_hpc.models.registry import get_backbone

    probs = get_backbone("vit").space(cfg.model.vit).probabilities()
    items = list(probs.items())
    mean = sum(p * exp["elastic"][s] for s, p in items)
    assert exp["elastic_mean"] == pytest.approx(mean, rel=1e-12)
    brute = 0.0
    for draw in itertools.product(items, repeat=3):
        prob = 1.0
        for _, p in draw:
            prob *= p
        brute += prob * max(exp["elastic"][s] for s, _ in draw)
    assert exp["elastic_expected_max"] == pytest.approx(brute, rel=1e-9)
    assert exp["step_critical"] > exp["step_mean"]


def test_estimate_flops_cli(tmp_path, capsys):
    assert main(["estimate", "flops", "--config", "configs/demo_cpu.yaml", "--no-expectation", "--out", str(tmp_path),
                 "optim.batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "teacher Sinkhorn-Knopp" in out and "what MFU counts" in out
    (path,) = tmp_path.glob("flops_*.json")
    result = json.loads(path.read_text())
    assert {"device", "versions", "commit", "rows", "step_matmul_flops"} <= result.keys()
    assert sum(r["matmul_flops"] for r in result["rows"]) == result["step_matmul_flops"]
    assert main(["estimate", "flops", "--config", "configs/demo_cpu.yaml", "--sub", "7x7"]) == 2
    assert "--sub" in capsys.readouterr().err
