"""The speed-up benchmark's bookkeeping: matched arms, seed-by-seed ratios, time to baseline."""
import dataclasses
import numpy as np
import pytest

from mixpipe.bench.speedup import SpeedupSettings, format_table, summarise, targets, \
    time_to_reach
from mixpipe.bench.speedup.settings import arm_policy as policy_settings
from mixpipe.bench.speedup.settings import budget_epochs, run_epochs
from mixpipe.core.ledger import Ledger
from mixpipe.core.policies import make_plan


def _history(policy, seed, seconds, inputs, top1):
    epochs = [{"train_seconds": s, "forward_inputs": i, "top1": t, "data_wait_seconds": 0.1}
              for s, i, t in zip(seconds, inputs, top1)]
    return {"policy": policy, "seed": seed, "epochs": epochs, "train_seconds": sum(seconds),
            "forward_inputs": sum(inputs), "final_top1": top1[-1]}


def test_time_to_reach_counts_training_time_up_to_the_first_good_epoch():
    h = _history("x", 0, [10, 20, 30], [5, 5, 5], [0.5, 0.8, 0.7])
    assert time_to_reach(h, 0.8) == 30
    assert time_to_reach(h, 0.5) == 10
    assert time_to_reach(h, 0.9) is None


def test_summary_ratios_are_taken_seed_by_seed():
    s = SpeedupSettings(epochs=2, policies=("none", "mixtrain"), seeds=(0, 1))
    runs = [_history("none", 0, [10, 10], [100, 100], [0.8, 0.9]),
            _history("mixtrain", 0, [10, 5], [100, 50], [0.8, 0.88]),
            _history("none", 1, [20, 20], [100, 100], [0.8, 0.9]),
            _history("mixtrain", 1, [20, 20], [100, 100], [0.85, 0.92])]
    summary = summarise(s, runs, num_samples=100)
    mix = summary["mixtrain"]
    assert mix["speedup"] == pytest.approx(np.mean([20 / 15, 40 / 40]))
    assert mix["speedup_per_seed"] == pytest.approx({0: 20 / 15, 1: 1.0})
    assert mix["speedup_bound"] == pytest.approx(np.mean([200 / 150, 1.0]))
    assert mix["bound_efficiency"] == pytest.approx(mix["speedup"] / mix["speedup_bound"])
    assert mix["delta_vs_none"] == pytest.approx(np.mean([-2.0, 2.0]))
    assert mix["delta_vs_none_per_seed"] == pytest.approx({0: -2.0, 1: 2.0})
    assert mix["final_top1_per_seed"] == {0: 0.88, 1: 0.92}
    assert mix["reached_baseline"] == 1  # seed 0 never reached 0.9, seed 1 did at 40 s
    assert mix["time_to_baseline_top1"] == pytest.approx(40)
    assert summary["none"]["speedup"] == pytest.approx(1.0)
    table = format_table(s, summary)
    assert "mixtrain" in table and "1.17x" in table


def test_a_frontier_from_one_seed_is_summarised_and_drawn_from_that_seed(tmp_path):
    from mixpipe.bench.speedup import plot

    s = SpeedupSettings(epochs=2, policies=("none", "mixtrain"), seeds=(0, 1), frontier=(0.5,),
                        frontier_seeds=(1,))
    runs = [_history("none", 0, [10, 10], [100, 100], [0.8, 0.9]),
            _history("mixtrain", 0, [10, 5], [100, 50], [0.8, 0.88]),
            _history("none", 1, [20, 20], [100, 100], [0.8, 0.92]),
            _history("mixtrain", 1, [20, 20], [100, 100], [0.85, 0.92]),
            _history("none@0.5", 1, [20], [100], [0.86])]
    summary = summarise(s, runs, num_samples=100)
    point = summary["none@0.5"]
    assert point["runs"] == 1 and point["final_top1_per_seed"] == {1: 0.86}
    assert point["delta_vs_none_per_seed"] == pytest.approx({1: -6.0})  # against seed 1's none
    assert summary["mixtrain"]["runs"] == 2
    assert "none@0.5" in format_table(s, summary)
    png = tmp_path / "f.png"
    plot(runs, s, summary, str(png))
    assert png.stat().st_size > 0


def test_budget_deltas_and_targets_are_taken_seed_by_seed():
    s = SpeedupSettings(epochs=2, policies=("none", "budget", "random", "mixtrain"),
                        seeds=(0, 1, 2))
    top = {"none": [0.930, 0.931, 0.929], "budget": [0.925, 0.926, 0.930],
           "random": [0.910, 0.912, 0.935], "mixtrain": [0.929, 0.930, 0.931]}
    runs = [_history(arm, seed, [10, 10 if arm == "none" else 5.5], [100, 100 if arm == "none"
                                                                     else 80], [0.5, t])
            for seed in range(3) for arm, tops in top.items() for t in [tops[seed]]]
    summary = summarise(s, runs, num_samples=100)
    mix = summary["mixtrain"]
    assert mix["delta_vs_budget_per_seed"] == pytest.approx({0: 0.4, 1: 0.4, 2: 0.1})
    assert mix["delta_vs_budget"] == pytest.approx(0.3)
    assert mix["seeds_at_or_above_budget"] == 3
    assert summary["budget"]["delta_vs_budget"] == pytest.approx(0.0)
    met = targets(s, summary)
    assert met["mixtrain_vs_budget"]["met"] is True
    assert met["mixtrain_beats_random"]["seeds_won"] == 2
    assert met["mixtrain_beats_random"]["met"] is False  # seed 2: random 93.5 > 93.1
    assert met["mixtrain_vs_none"]["met"] is False  # bound 200 / 180 = 1.11x < 1.6x
    assert "Δ vs budget" in format_table(s, summary)


@pytest.mark.parametrize("schedule", [
    dict(epochs=20),
    dict(epochs=7, fraction=0.6, mix_schedule="constant", fraction_start=None),
    dict(epochs=5, layout="halves", fraction_start=0.2, fraction=0.9, final_full_epochs=1),
    dict(epochs=6, recalibrate=150),
    dict(epochs=8, halves_share=0.4, fraction_start=0.5, fraction=0.9)])
def test_budget_arm_trains_on_mixtrains_forward_inputs(schedule):
    """Independent count: the mixtrain policy's real plans, epoch by epoch, against the budget
    arm's real plans (whole epochs and the partial last one)."""
    n = 997
    s = SpeedupSettings(**schedule)
    ledger = Ledger(n)
    ledger.update(0, np.arange(n), np.random.default_rng(0).random(n).astype(np.float32))
    snap = ledger.snapshot()
    mixtrain = sum(make_plan(snap, policy_settings("mixtrain", s), 0, e).num_forward_inputs
                   for e in range(s.epochs))
    mixtrain += s.recalibrate  # the norms' pass on single images counts as mixtrain's inputs
    assert budget_epochs(s, n) == pytest.approx(mixtrain / n)
    budget = policy_settings("budget", s, n)
    epochs = run_epochs("budget", s, n)
    assert epochs == int(np.ceil(mixtrain / n)) <= s.epochs
    inputs = [make_plan(snap, budget, 0, e).num_forward_inputs for e in range(epochs)]
    assert sum(inputs) == mixtrain  # to the sample: a partial last epoch, not rounding
    assert 0 < inputs[-1] < n or mixtrain % n == 0


@pytest.mark.parametrize("extra", [dict(halves_share=0.5), dict(skip_hardest=0.05),
                                   dict(halves_share=0.3, skip_hardest=0.1)])
def test_random_arm_matches_mixtrains_forward_inputs_with_tiers_and_skips(extra):
    """Random has one tier of quads and leaves nothing out; mixtrain's halves save a third less
    per sample and its left-out samples save a pass each, and random's share must follow, or
    the two would not be compared at equal inputs. mixtrain's inputs: the policy's own count,
    checked against real epochs in test_skip_hardest.py and test_tiers.py."""
    n = 2000
    s = SpeedupSettings(epochs=12, fraction_start=0.5, fraction=0.9, **extra)
    snap = Ledger(n).snapshot()
    mixed = budget_epochs(s, n) * n
    rand = sum(make_plan(snap, policy_settings("random", s), 0, e).num_forward_inputs
               for e in range(s.epochs))
    assert abs(rand - mixed) <= 4 * s.epochs  # each side rounds to whole groups each epoch


def test_bench_settings_refuse_a_halves_share_without_quads():
    with pytest.raises(ValueError, match="halves_share"):
        SpeedupSettings(layout="halves", halves_share=0.3)


def test_frontier_arms_train_fractions_of_the_run():
    from mixpipe.bench.speedup.settings import arm_names

    s = SpeedupSettings(epochs=10, policies=("none", "mixtrain"), frontier=(0.4, 0.55, 1.0))
    assert arm_names(s) == ["none", "mixtrain", "none@0.4", "none@0.55"]  # 1.0 is none itself
    n = 200
    snap = Ledger(n).snapshot()
    for arm, want in (("none@0.4", 4 * n), ("none@0.55", 5.5 * n)):
        settings = policy_settings(arm, s, n)
        got = sum(make_plan(snap, settings, 1, e).num_forward_inputs
                  for e in range(run_epochs(arm, s, n)))
        assert got == want


def test_frontier_seeds_keep_the_frontier_to_those_seeds_and_every_other_arm_in_all():
    from mixpipe.bench.speedup.settings import seed_arms

    s = SpeedupSettings(epochs=10, policies=("none", "budget", "mixtrain"), frontier=(0.4, 0.7),
                        seeds=(0, 1, 2), frontier_seeds=(1,))
    assert seed_arms(s, 1) == ["none", "budget", "mixtrain", "none@0.4", "none@0.7"]
    assert seed_arms(s, 0) == seed_arms(s, 2) == ["none", "budget", "mixtrain"]
    every = dataclasses.replace(s, frontier_seeds=())
    assert all(seed_arms(every, seed) == seed_arms(s, 1) for seed in (0, 1, 2))
    with pytest.raises(ValueError, match="frontier_seeds"):
        dataclasses.replace(s, frontier_seeds=(5,))


@pytest.mark.parametrize("schedule", [
    dict(fraction=0.8, final_full_epochs=1, mix_schedule="constant", fraction_start=None),
    dict(mix_schedule="ramp", fraction_start=1.0, fraction=0.3),
    dict(mix_schedule="ramp", fraction_start=0.2, fraction=0.9, layout="halves")])
def test_random_arm_gets_mixtrains_forward_inputs_over_the_run(schedule):
    n, epochs = 1000, 6
    s = SpeedupSettings(epochs=epochs, warmup_epochs=1, **schedule)
    ledger = Ledger(n)
    ledger.update(0, np.arange(n), np.random.default_rng(0).random(n).astype(np.float32))
    snap = ledger.snapshot()
    total = {}
    for arm in ("random", "mixtrain"):
        settings = policy_settings(arm, s)
        total[arm] = sum(make_plan(snap, settings, seed=0, epoch=e).num_slots
                         for e in range(epochs))
    assert total["mixtrain"] < n * epochs
    # each epoch rounds its group count: at most one group (group_size - 1 slots) apart
    assert abs(total["random"] - total["mixtrain"]) <= epochs * (s.group_size - 1)


def test_settings_are_validated_with_the_field_named():
    with pytest.raises(ValueError, match="policies"):
        SpeedupSettings(policies=("none", "bogus"))
    with pytest.raises(ValueError, match="fraction"):
        SpeedupSettings(fraction=1.5)
    with pytest.raises(ValueError, match="final_full_epochs"):
        SpeedupSettings(epochs=3, warmup_epochs=1, final_full_epochs=3)
    with pytest.raises(ValueError, match="fraction_start"):
        SpeedupSettings(mix_schedule="ramp", fraction_start=None)
    with pytest.raises(ValueError, match="fraction_start"):
        SpeedupSettings(mix_schedule="constant", fraction_start=0.5)
    with pytest.raises(ValueError, match="loss_per"):
        SpeedupSettings(loss_per="sample")
    with pytest.raises(ValueError, match="statistic"):
        SpeedupSettings(statistic="median")


def test_mixtrain_arm_takes_the_benchmarks_ranking_statistic():
    for stat in ("ema", "last"):
        assert policy_settings("mixtrain", SpeedupSettings(statistic=stat)).statistic == stat


def test_a_ramp_runs_over_the_mixed_epochs_from_start_to_end():
    s = SpeedupSettings(epochs=7, warmup_epochs=1, final_full_epochs=1, mix_schedule="ramp",
                        fraction_start=0.9, fraction=0.5)
    fractions = s.mixtrain_fractions()
    assert fractions[0] == 0 and fractions[-1] == 0
    np.testing.assert_allclose(fractions[1:-1], np.linspace(0.9, 0.5, 5))


def test_subset_passes_the_labels_of_its_samples_on():
    from mixpipe.data.subset import FirstN as _Subset

    class Base:
        labels = np.arange(10) % 3

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return np.zeros((2, 2, 3), np.uint8), int(self.labels[i])

    sub = _Subset(Base(), 4)
    np.testing.assert_array_equal(sub.labels, [0, 1, 2, 0])
    assert [sub[i][1] for i in range(len(sub))] == sub.labels.tolist()
    with pytest.raises(IndexError):
        sub[4]
    assert _Subset([(np.zeros(1), 0)], None).labels is None


def test_demo_plans_follow_the_ramp_and_bound_its_docs_state():
    """The README and mixpipe.demo quote the demo's shares (45 %, 62.5 %, 80 %) and bound (1.54x);
    the plans the mixtrain policy makes from the demo's settings must match them."""
    from mixpipe.demo import DEMO

    n = 4000
    ledger = Ledger(n)
    ledger.update(0, np.arange(n), np.random.default_rng(1).random(n).astype(np.float32))
    snap = ledger.snapshot()
    settings = policy_settings("mixtrain", DEMO)
    slots = [make_plan(snap, settings, seed=0, epoch=e).num_slots for e in range(DEMO.epochs)]
    # independent reference: warm-up unmixed, then a linear ramp; a QUADS composite of 4 mixed
    # samples is one forward input, so an epoch with share f costs n * (1 - 3f / 4) inputs
    shares = np.r_[np.zeros(DEMO.warmup_epochs),
                   np.linspace(DEMO.fraction_start, DEMO.fraction, DEMO.mixed_epochs)]
    np.testing.assert_allclose(shares, [0, 0.45, 0.625, 0.80])
    np.testing.assert_allclose(slots, n * (1 - 0.75 * shares), atol=4)
    assert round(n * DEMO.epochs / sum(slots), 2) == 1.54


def test_budget_waits_for_an_arm_whose_inputs_only_its_run_knows():
    from mixpipe.bench.speedup.settings import run_order

    s = SpeedupSettings(policies=("none", "budget", "shrink+mixtrain"),
                        budget_match="shrink+mixtrain")
    assert run_order(s) == ["none", "shrink+mixtrain", "budget"]
    with pytest.raises(ValueError, match="known only after its run"):
        policy_settings("budget", s, 100)
    budget = policy_settings("budget", s, 100, matched_inputs=1234)
    assert budget.epochs == pytest.approx(12.34) and run_epochs("budget", s, 100, 1234) == 13
    with pytest.raises(ValueError, match="must run too"):
        run_order(SpeedupSettings(policies=("budget", "mixtrain"), budget_match="shrink"))
    # mixtrain's inputs follow from its schedule: no reordering needed
    assert run_order(SpeedupSettings(policies=("budget", "mixtrain"))) == ["budget", "mixtrain"]


def test_shrink_mixtrain_arm_skips_some_and_mixes_others():
    n = 2000
    s = SpeedupSettings(epochs=6, policies=("shrink+mixtrain",), prune_ratio=0.3)
    ledger = Ledger(n)
    ledger.update(0, np.arange(n), np.random.default_rng(2).random(n).astype(np.float32))
    plan = make_plan(ledger.snapshot(), policy_settings("shrink+mixtrain", s), 0, 2)
    assert plan.skipped.size > 0 and (plan.counts == 4).any() and (plan.counts == 1).any()


def _cli(*argv):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mixpipe", "bench", "speedup", "--no-progress",
                           *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv,message", [
    (["--data", "/nonexistent/tree"], "not a directory"),
    (["--device", "cuda", "--limit", "10"], "no usable CUDA device"),
    (["--device", "tpu"], "use cpu, cuda or cuda:N")])
def test_bad_command_lines_end_in_one_line_naming_the_fix(argv, message):
    done = _cli(*argv)
    assert done.returncode != 0
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in done.stderr


def test_an_unprepared_tree_is_named_with_the_prepare_command(tmp_path):
    (tmp_path / "tree" / "train" / "cls").mkdir(parents=True)
    done = _cli("--data", str(tmp_path / "tree"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "mixpipe data prepare tree --src" in done.stderr


def test_one_epoch_is_enough_for_the_plain_arms():
    SpeedupSettings(epochs=1, policies=("none", "budget"))  # no mixing arm: no warm-up needed
    with pytest.raises(ValueError, match="warmup_epochs"):
        SpeedupSettings(epochs=1, policies=("none", "mixtrain"))


def test_library_and_benchmark_share_the_loss_normalisation():
    import inspect

    from mixpipe.bench.speedup.settings import LOSS_PER, NORMALISATIONS
    from mixpipe.train import fit
    from mixpipe.train import loss

    assert NORMALISATIONS == loss.NORMALISATIONS
    for fn, name in ((fit, "loss_per"), (loss.mixed_loss, "per"), (loss.batch_loss, "per")):
        assert inspect.signature(fn).parameters[name].default == LOSS_PER == "slot"
    assert SpeedupSettings().loss_per == LOSS_PER


@pytest.mark.slow
def test_an_unreachable_server_is_one_line_not_a_traceback():
    done = _cli("--server", "tcp://127.0.0.1:9", "--policies", "mixtrain", "--seeds", "0",
                "--limit", "50", "--eval-limit", "20", "--epochs", "2", "--out", "/dev/null")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no selection server at tcp://127.0.0.1:9" in done.stderr


def test_only_mixing_arms_recalibrate_their_norms():
    from mixpipe.bench.speedup.settings import recalibration_images

    s = SpeedupSettings(epochs=4, recalibrate=300, frontier=(0.5,))
    assert [recalibration_images(s, a, 1000) for a in ("none", "budget", "none@0.5")] == [0] * 3
    assert [recalibration_images(s, a, 1000) for a in ("random", "mixtrain")] == [300, 300]
    assert recalibration_images(s, "mixtrain", 200) == 200  # never more than the data set
    with pytest.raises(ValueError, match="recalibrate"):
        SpeedupSettings(recalibrate=-1)


def test_only_mixing_arms_split_their_norms_and_the_split_model_is_the_one_trained(monkeypatch):
    from mixpipe.bench.speedup import arms
    from mixpipe.bench.speedup.settings import splits_norms
    from mixpipe.train.splitnorm import split_norm_layers

    assert not SpeedupSettings().split_norms  # off by default (benchmarks/README.md)
    s = SpeedupSettings(epochs=2, frontier=(0.5,), split_norms=True)
    assert [splits_norms(s, a) for a in ("none", "budget", "none@0.5")] == [False] * 3
    assert [splits_norms(s, a) for a in ("random", "mixtrain")] == [True, True]
    assert not splits_norms(SpeedupSettings(epochs=2, split_norms=False), "mixtrain")
    trained = {}

    def spy_fit(model, loader, optimizer, *args, **kwargs):
        optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
        layers = split_norm_layers(model)
        trained.update(layers=len(layers), twins_optimised=bool(layers) and all(
            id(p) in optimised for m in layers for p in m.aux.parameters()))
        return {"epochs": [], "final_top1": None, "forward_inputs": 0, "train_seconds": 0.0}

    monkeypatch.setattr("mixpipe.train.fit", spy_fit)
    train = [(np.zeros((16, 16, 3), np.uint8), i % 2) for i in range(16)]
    small = SpeedupSettings(epochs=2, image_size=16, batch_size=4, split_norms=True)
    for arm, split in (("mixtrain", True), ("none", False)):
        arms.train_arm(small, arm, 0, train, None, 2, log=lambda *a, **k: None)
        assert (trained["layers"] > 0) is split
        assert trained["twins_optimised"] is split
