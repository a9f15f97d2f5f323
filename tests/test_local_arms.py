"""LoCal+SGD as arms of the speed-up benchmark: priced by what its pass runs, matched by a budget
in FLOPs, and set against the plain model's curve at equal compute."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mixpipe.bench.speedup import arms
from mixpipe.bench.speedup.compute import (compute, count_local_pass, local_pass_flops,
                                           pass_flops)
from mixpipe.bench.speedup.report import reach, summarise
from mixpipe.bench.speedup.settings import (LOCAL_ARMS, SpeedupSettings, arm_epochs, arm_local,
                                            arm_policy, run_order, trains_plain_model,
                                            traces_frontier)
from mixpipe.core.policies.none import NoneSettings
from test_progressive import Images  # square 32 px images, two classes


def test_a_local_pass_of_a_linear_net_costs_what_a_hand_count_says():
    a, b, c, batch = 6, 5, 4, 3
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))
    x = torch.randn(batch, a)
    forward = 2 * batch * a * b + 2 * batch * b * c
    # boundary 0: plain backprop; the input needs no gradient, so the first layer has no dX
    backprop = 2 * batch * b * c * 2 + 2 * batch * a * b
    assert count_local_pass(net, x, 0) * batch == forward + backprop
    # boundary 1: the first layer runs Oja's rule (<y x^T>, <y y^T>, (y y^T) W), the last one
    # only its weight gradient (its input comes from a block autograd does not record)
    rule = 2 * batch * b * a + 2 * batch * b * b + 2 * b * b * a
    assert count_local_pass(net, x, 1) * batch == forward + rule + 2 * batch * b * c


def test_a_local_pass_of_a_conv_net_counts_the_weight_gradient_gemm_of_the_rule():
    cin, cout, side, batch, k = 3, 4, 6, 2, 3
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(cin, cout, k, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(cout, 2, 1, bias=False))
    x = torch.randn(batch, cin, side, side)
    positions = batch * side * side
    conv1 = 2 * positions * cout * cin * k * k
    conv2 = 2 * positions * 2 * cout
    rule = conv1 + 2 * positions * cout * cout + 2 * cout * cout * cin * k * k
    assert count_local_pass(net, x, 1) * batch == conv1 + conv2 + rule + conv2


def test_a_resnet_pass_gets_cheaper_as_the_boundary_moves_and_matches_backprop_at_zero():
    costs = [local_pass_flops("resnet-tiny", 32, 10, t) for t in range(4)]
    assert costs[0] == pass_flops("resnet-tiny", 32, 10)
    assert all(later < earlier for earlier, later in zip(costs, costs[1:]))
    assert costs[-1] > 0.5 * costs[0]  # the forward and the last blocks' backward remain


def test_local_arms_train_the_plain_model_and_refuse_the_global_flag():
    s = SpeedupSettings(policies=("none", "local-static", "local-dynamic"))
    for arm, kind in LOCAL_ARMS.items():
        assert arm_local(arm, s) == kind
        assert isinstance(arm_policy(arm, s), NoneSettings)
        assert trains_plain_model(arm) and not traces_frontier(arm)
    assert arm_local("none", s) is None
    assert arm_local("mixtrain", SpeedupSettings(local="dynamic")) == "dynamic"
    with pytest.raises(ValueError, match="local=.*LoCal arm"):
        SpeedupSettings(policies=("none", "local-static"), local="static")


def test_a_local_arm_is_priced_epoch_by_epoch_and_a_budget_matches_its_flops():
    n = 120
    s = SpeedupSettings(epochs=3, batch_size=40, policies=("none", "budget", "local-static"),
                        budget_match="local-static", progress=False, threads=None)
    assert run_order(s) == ["none", "local-static", "budget"]
    history = arms.train_arm(s, "local-static", 0, Images(n), None, 2,
                             log=lambda *a, **k: None)
    boundaries = [r["local_transition"] for r in history["epochs"]]
    assert boundaries == sorted(boundaries) and boundaries[-1] > boundaries[0]
    for record in history["epochs"]:
        assert record["pass_flops"] == local_pass_flops(s.model, 32, 2,
                                                        record["local_transition"])
    full = pass_flops(s.model, 32, 2)
    spent = sum(n * local_pass_flops(s.model, 32, 2, t) for t in boundaries)
    assert history["train_flops"] == pytest.approx(spent)
    assert history["plain_passes"] == pytest.approx(spent / full)
    assert history["plain_passes"] < 3 * n
    # the budget arm runs as many plain passes as the LoCal arm's FLOPs buy
    assert arm_epochs("budget", s, n, history["plain_passes"]) == pytest.approx(spent / full / n)


def _epochs(top1s, inputs, seconds=10.0, passes=None):
    return [dict(top1=t, forward_inputs=inputs, train_seconds=seconds, data_wait_seconds=0.0,
                 **({} if passes is None else {"plain_passes": passes})) for t in top1s]


def test_reach_counts_epochs_seconds_and_plain_compute_to_the_first_good_epoch():
    history = {"epochs": _epochs([0.5, 0.7, 0.8], 70, 5.0)}
    assert reach(history, 0.7, 100) == {"epochs": 2.0, "seconds": 10.0, "compute": 1.4}
    assert reach(history, 0.81, 100) is None
    priced = {"epochs": _epochs([0.5, 0.9], 100, 4.0, passes=80.0)}
    assert reach(priced, 0.9, 100)["compute"] == pytest.approx(1.6)


def test_summary_gives_a_priced_arms_bound_in_flops_and_its_shares_to_none():
    s = SpeedupSettings(epochs=4, policies=("none", "local-static"), seeds=(0,))
    none = dict(policy="none", seed=0, forward_inputs=400, train_seconds=40.0, final_top1=0.8,
                epochs=_epochs([0.5, 0.6, 0.7, 0.8], 100), epochs_of_data=4.0)
    local = dict(policy="local-static", seed=0, forward_inputs=400, train_seconds=32.0,
                 final_top1=0.81, plain_passes=320.0, epochs_of_data=4.0,
                 epochs=_epochs([0.6, 0.7, 0.8, 0.81], 100, 8.0, passes=80.0))
    row = summarise(s, [none, local], 100)["local-static"]
    assert row["speedup_bound"] == pytest.approx(400 / 320)
    assert row["speedup"] == pytest.approx(40 / 32)
    assert row["epochs_to_baseline_share"] == pytest.approx(3 / 4)
    assert row["compute_to_baseline_share"] == pytest.approx(2.4 / 4)
    assert row["seconds_to_baseline_share"] == pytest.approx(24 / 40)


def _run(policy, seed, inputs, top1):
    return {"policy": policy, "seed": seed, "forward_inputs": inputs, "final_top1": top1}


def test_compute_sets_each_arm_against_the_plain_curve_at_its_own_flops_seed_by_seed():
    s = dict(policies=["none", "assist"], seeds=[0, 1], frontier=[0.5], epochs=10)
    runs = [_run("none", 0, 1000, 0.80), _run("none@0.5", 0, 500, 0.70),
            _run("assist", 0, 700, 0.78),
            _run("none", 1, 1000, 0.82), _run("none@0.5", 1, 500, 0.72),
            _run("assist", 1, 400, 0.70)]  # below the curve's cheapest point: not extrapolated
    payload = {"settings": s, "num_classes": 10, "runs": runs}
    rows = {r["arm"]: r for r in compute([payload], ["run"])["rows"]}
    assist = rows["assist"]
    assert assist["frontier_top1_per_seed"][0] == pytest.approx(70.0 + 10.0 * 200 / 500)
    assert assist["delta_vs_frontier_per_seed"][0] == pytest.approx(78.0 - 74.0)
    assert assist["frontier_top1_per_seed"][1] is None
    assert assist["delta_vs_frontier"] == pytest.approx(4.0)
    assert assist["seeds_at_or_above_frontier"] == 1
    assert "delta_vs_frontier" not in rows["none"] and "delta_vs_frontier" not in rows["none@0.5"]
