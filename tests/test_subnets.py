"""The sub-network space, eq. 14 weights and the deterministic sampler."""

import collections

import numpy as np
import pytest

from poa_hpc.config import load_config
from poa_hpc.models.registry import get_backbone
from poa_hpc.models.subnets import Subnet, SubnetSampler, SubnetSpace


@pytest.fixture(scope="module")
def vit_l_space():
    cfg = load_config("configs/vit_l_poa.yaml")
    return get_backbone("vit").space(cfg.model.vit)


def test_vit_l_space_has_143_subnets(vit_l_space):
    assert len(vit_l_space.all()) == 143
    assert vit_l_space.widths == tuple(384 + 64 * i for i in range(11))
    assert vit_l_space.depths == tuple(range(12, 25))
    assert Subnet(384, 12) in vit_l_space and Subnet(768, 12) in vit_l_space
    assert vit_l_space.intact == Subnet(1024, 24)


def test_eq14_weights_by_hand(vit_l_space):
    w = vit_l_space.weights()
    assert Subnet(1024, 24) not in w  # intact pair dropped
    assert w[Subnet(384, 12)] == 9  # round(3 * 3)
    assert w[Subnet(1024, 12)] == 3  # round(1 * 3)
    assert w[Subnet(384, 24)] == 3
    # (704, 18): w_scale = 3 - 2*5/10 = 2, d_scale = 3 - 2*6/12 = 2 -> 4
    assert w[Subnet(704, 18)] == 4
    # (1024, 23): 1 * (3 - 2*11/12) = 1.1667 -> 1
    assert w[Subnet(1024, 23)] == 1
    # The authors' list has 573 entries with the intact pair (np.linspace scales, np.round).
    assert sum(w.values()) == 572
    probs = vit_l_space.probabilities()
    assert probs[Subnet(384, 12)] == pytest.approx(9 / 572)
    assert sum(probs.values()) == pytest.approx(1.0)


def test_uniform_when_s_is_one():
    space = SubnetSpace((1, 2, 3), (4, 5), s=1.0)
    assert set(space.weights().values()) == {1}


def test_sampler_frequencies_exact_per_cycle(vit_l_space):
    s = SubnetSampler(vit_l_space, seed=0)
    n = len(s.pool)
    counts = collections.Counter(s.sample(t) for t in range(n, 2 * n))
    assert counts == collections.Counter(vit_l_space.weights())
    assert Subnet(1024, 24) not in counts


def test_sampler_deterministic_and_resumable(vit_l_space):
    a = [SubnetSampler(vit_l_space, seed=3, rank=1).sample(t) for t in range(700, 720)]
    b = SubnetSampler(vit_l_space, seed=3, rank=1)
    assert [b.sample(t) for t in range(700, 720)] == a
    c = SubnetSampler(vit_l_space, seed=4, rank=1)
    assert [c.sample(t) for t in range(700, 720)] != a


def test_rank_modes(vit_l_space):
    r0 = [SubnetSampler(vit_l_space, 0, rank=0).sample(t) for t in range(50)]
    r1 = [SubnetSampler(vit_l_space, 0, rank=1).sample(t) for t in range(50)]
    assert r0 != r1  # per_rank (paper): each GPU trains a different sub-network
    s0 = [SubnetSampler(vit_l_space, 0, rank=0, mode="shared").sample(t) for t in range(50)]
    s1 = [SubnetSampler(vit_l_space, 0, rank=1, mode="shared").sample(t) for t in range(50)]
    assert s0 == s1


def test_small_subnets_sampled_more_often(vit_l_space):
    s = SubnetSampler(vit_l_space, seed=0)
    widths = np.array([s.sample(t).width for t in range(len(s.pool))])
    assert (widths == 384).sum() > 2 * (widths == 1024).sum()


def test_parse():
    assert Subnet.parse("384x12") == Subnet(384, 12)
    with pytest.raises(ValueError, match="WIDTHxDEPTH"):
        Subnet.parse("384-12")


def test_space_resolve_names_sizes_and_all():
    """One owner for sub-network names: named sizes, their short forms, WIDTHxDEPTH, per-stage depths, all."""
    from poa_hpc.models.subnets import depth_str

    space = SubnetSpace(widths=(192, 384), depths=(6, 12))
    named = {"ViT-S": Subnet(384, 12), "ViT-Ti": Subnet(192, 12)}
    assert space.resolve("ViT-S", named) == [Subnet(384, 12)]
    assert space.resolve("vit-ti, s ,192x6,384X12", named) == [Subnet(192, 12), Subnet(384, 12), Subnet(192, 6)]
    assert space.resolve("all") == space.all()
    for bad, why in (("ViT-L", "is not a sub-network name"), ("384x7", "is not in the elastic space")):
        with pytest.raises(ValueError, match=why) as exc:
            space.resolve(bad, named)
        assert "allowed: all, ViT-S/S (384x12), ViT-Ti/Ti (192x12), or WIDTHxDEPTH with widths [192, 384]" in str(exc.value)
    assert str(Subnet(64, (3, 4, 6, 3))) == "64x3-4-6-3" == f"64x{depth_str([3, 4, 6, 3])}"
    staged = SubnetSpace(widths=(32, 64), depths=((2, 2, 2, 2), (3, 4, 6, 3)))
    assert staged.resolve("64x3-4-6-3") == [Subnet(64, (3, 4, 6, 3))]
