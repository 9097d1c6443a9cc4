"""The layout planner: its cost model on synthetic cost curves with a known best layout, and
``piadm plan`` / ``sampler.method = "auto"`` end to end on a small exact model."""
import dataclasses
import json

import pytest
import torch
import xarray as xr

from pipeline.api import load_config, sample
from pipeline.cli import main
from pipeline.plan import CostCurve, Layout, Machine, Plan, Profile, layouts, predict, rank

SEQUENTIAL = Profile("sequential-sde", 0, None, 1000, 1000.0, (1,), (0.0,), 0)
WINDOW = Profile("pc-window", 64, 1e-3, 40, 2400.0, (8, 60), (0.0, 0.0), 2)


def _best(profiles, curve, machine, members, batches=(1, 2, 4, 8, 16, 32, 64), replicable=(),
          items=1):
    pairs = layouts(profiles, machine.ranks, members, batches, replicable, items)
    return rank([predict(lay, prof, curve, machine, members, items=items) for lay, prof in pairs])


def test_the_cost_curve_interpolates_and_extends_its_last_segment():
    curve = CostCurve((1, 8, 16), (0.010, 0.010, 0.020), (0.0, 0.0, 0.004))
    assert curve.at(0) == (0.0, 0.0)
    assert curve.at(4) == pytest.approx((0.010, 0.0))
    assert curve.at(12) == pytest.approx((0.015, 0.002))
    assert curve.at(32) == pytest.approx((0.040, 0.012))  # the last slope, carried on


def test_host_time_below_its_measured_points_is_not_less_than_in_proportion():
    """Two noisy measurements made a steep line that fell to 0 below them: a round of 2
    points on 3 slices was planned 24 times faster than the sequential sampler."""
    prof = dataclasses.replace(WINDOW, host_points=(4, 6), host=(0.122, 0.425))
    assert prof.host_at(2) == pytest.approx(0.061)  # 0.122 x 2 / 4, not 0
    assert prof.host_at(5) == pytest.approx(0.2735)  # between them: on the line
    flat = dataclasses.replace(WINDOW, host_points=(4, 6), host=(0.1, 0.1))
    assert flat.host_at(2) == pytest.approx(0.1)  # the line, where it is the larger
    falling = CostCurve((4, 8), (1.0, 0.5), (0.0, 0.0))  # a noisy pair: not 0 past them
    assert falling.at(24)[0] == pytest.approx(0.5)


def test_members_not_a_power_of_two_a_group_are_planned_in_one_batch_a_group():
    """8 members on 3 groups: the batch sizes tried were powers of 2 (1 and 2 fit), each
    group then ran its 3 members in two or three batches; 3 runs them in one."""
    curve = CostCurve((1, 8), (0.005, 0.012), (0.0, 0.0))  # a latency, then 1 ms an item
    machine = Machine(ranks=3, ranks_per_node=3, cores=3, threads=1, latency=1e-5)
    best = _best([SEQUENTIAL], curve, machine, members=8)[0]
    assert (best.layout.groups, best.layout.batch) == (3, 3)


def test_a_latency_bound_device_and_one_member_pick_all_ranks_as_time_slices():
    # a GPU-like curve: flat to 8 items, then linear; 8 ranks, one member; the window's 60
    # points a round fill the flat part only on 8 slices
    curve = CostCurve((1, 8, 64), (0.005, 0.005, 0.040), (0.0, 0.0, 0.0))
    machine = Machine(ranks=8, ranks_per_node=8, cores=64, threads=1, latency=1e-5)
    best = _best([SEQUENTIAL, WINDOW], curve, machine, members=1)[0]
    assert (best.layout.method, best.layout.time_slices) == ("pc-window", 8)
    # 40 rounds of one flat call (8 points a rank) against 1000 sequential calls
    assert best.seconds == pytest.approx(40 * (0.005 + 2 * 1e-5 * 3))


def test_a_compute_bound_device_with_many_members_picks_sequential_groups():
    # every item costs the same: parallel rounds only add the window's extra calls
    curve = CostCurve((1, 512), (0.001, 0.512), (0.0, 0.0))
    machine = Machine(ranks=8, ranks_per_node=8, cores=64, threads=1, latency=1e-5)
    ranked = _best([SEQUENTIAL, WINDOW], curve, machine, members=64)
    best = ranked[0]
    assert best.layout == Layout("sequential-sde", 0, 8, 1, 8)
    assert best.seconds == pytest.approx(1000 * 0.008)  # one batch of 8 per group
    assert all(p.seconds >= best.seconds for p in ranked)


def test_many_items_of_one_member_each_pick_sequential_groups_as_many_members_do():
    """A batch holds one item's members: 400 items of 4 members are 400 batches, which the
    plan counted as the one batch of 4 members (it picked a window on 8 time slices, 2.5
    times slower than sequential groups when measured)."""
    curve = CostCurve((1, 8, 64), (0.005, 0.005, 0.040), (0.0, 0.0, 0.0))
    machine = Machine(ranks=8, ranks_per_node=8, cores=64, threads=1, latency=1e-5)
    one = _best([SEQUENTIAL, WINDOW], curve, machine, members=4)[0]
    assert one.layout.method == "pc-window"  # one item: the window on its slices
    best = _best([SEQUENTIAL, WINDOW], curve, machine, members=4, items=400)[0]
    assert best.layout == Layout("sequential-sde", 0, 8, 1, 4)
    assert best.seconds == pytest.approx(50 * 1000 * 0.005)  # 400 batches, 50 a group


def test_ranks_sharing_too_few_cores_stretch_the_busy_part():
    curve = CostCurve((1, 100), (0.001, 0.1), (0.001, 0.1))  # all CPU compute
    roomy = Machine(ranks=4, ranks_per_node=4, cores=4, threads=1, latency=0.0)
    crowded = Machine(ranks=4, ranks_per_node=4, cores=2, threads=1, latency=0.0)
    lay = Layout("pc-window", 64, 1, 4, 1)
    assert predict(lay, WINDOW, curve, crowded, 1).seconds == pytest.approx(
        2 * predict(lay, WINDOW, curve, roomy, 1).seconds)
    # one member on four sequential groups: three groups wait, one rank computes alone
    seq = Layout("sequential-sde", 0, 4, 1, 1)
    assert predict(seq, SEQUENTIAL, curve, crowded, 1).seconds == pytest.approx(1.0)


def test_host_time_grows_with_the_batch_as_measured_and_linearly_past_it():
    # 1 ms a round for one member, 3 ms for 5: each further member adds 0.5 ms
    grows = Profile("sequential-sde", 0, None, 1000, 1000.0, (1,), (1e-3,), 0, host_batch=5,
                    host_growth=3.0)
    assert [grows.host_at(1, b) for b in (1, 5, 9)] == pytest.approx([1e-3, 3e-3, 5e-3])
    free = CostCurve((1, 64), (0.0, 0.0), (0.0, 0.0))
    machine = Machine(ranks=1, ranks_per_node=1, cores=1, threads=1, latency=0.0)
    # 16 members host-bound: a batch of 16 takes 1000 rounds of 8.5 ms, 16 batches of one
    # 1000 of 1 ms; without the growth every batch size looked 16 times faster
    assert predict(Layout("sequential-sde", 0, 1, 1, 16), grows, free, machine,
                   16).seconds == pytest.approx(8.5)
    assert predict(Layout("sequential-sde", 0, 1, 1, 1), grows, free, machine,
                   16).seconds == pytest.approx(16.0)


def test_a_batch_takes_its_slowest_members_rounds_as_measured():
    # one member 26 rounds, 64 together 31 (each keeps its own window; the batch waits for
    # the last): the extra rounds cost their host work, not more of the members' points
    grows = Profile("pc-window", 32, 1e-3, 26, 832.0, (32,), (1e-3,), 2, host_batch=64,
                    host_growth=1.0, batch_rounds=31)
    assert [grows.rounds_at(b) for b in (1, 8, 64, 512)] == [26, 28, 31, 31]
    free = CostCurve((1, 10**6), (0.0, 0.0), (0.0, 0.0))
    machine = Machine(ranks=1, ranks_per_node=1, cores=1, threads=1, latency=0.0)
    pred = predict(Layout("pc-window", 32, 1, 1, 64), grows, free, machine, 64)
    assert (pred.rounds, pred.seconds) == (31, pytest.approx(31 * 1e-3))
    assert predict(Layout("pc-window", 32, 1, 1, 1), grows, free, machine, 1).rounds == 26


def test_a_block_that_falls_back_is_predicted_from_its_calls_not_their_mean():
    # a CPU whose second item is nearly free, then 12 ms an item; a block of 100 steps that
    # diverged: one wide sweep, then its 100 sequential steps one point at a time
    curve = CostCurve((1, 2, 200), (0.020, 0.025, 2.4), (0.0, 0.0, 0.0))
    machine = Machine(ranks=1, ranks_per_node=1, cores=4, threads=1, latency=0.0)
    fell = Profile("piadm-sde", 100, 1e-4, 101, 200.0, (2,), (0.0,), 2, 0, ((1, 100), (100, 1)))
    lay = Layout("piadm-sde", 100, 1, 1, 1)
    wide = curve.at(100)[0]
    assert predict(lay, fell, curve, machine, 1).seconds == pytest.approx(100 * 0.020 + wide)
    # the mean call (2 points) would have said 101 x 25 ms: a fifth too fast
    mean = dataclasses.replace(fell, calls_by_size=())
    assert predict(lay, mean, curve, machine, 1).seconds == pytest.approx(101 * 0.025)
    # two members a batch: every call twice as wide
    lay2 = dataclasses.replace(lay, batch=2)
    assert predict(lay2, fell, curve, machine, 2).seconds == pytest.approx(
        100 * 0.025 + curve.at(200)[0])


def test_a_replicated_window_wins_where_collectives_cost_and_the_whole_window_is_cheap():
    # a flat GPU-like curve to 8 items; one collective stage costs 1 ms
    curve = CostCurve((1, 8, 64), (0.005, 0.005, 0.040), (0.0, 0.0, 0.0))
    machine = Machine(ranks=8, ranks_per_node=8, cores=64, threads=1, latency=1e-3)
    free = dataclasses.replace(WINDOW, host=(0.0001, 0.0002))
    best = _best([SEQUENTIAL, free], curve, machine, members=1, replicable=("pc-window",))[0]
    assert best.layout == Layout("pc-window", 64, 1, 8, 1, replicated=True)
    # 40 rounds of one call of 8 items, the whole window's host work and one Allgather (3
    # stages), against two collectives on split slots
    assert best.seconds == pytest.approx(40 * (0.005 + 0.0002 + 3e-3))
    # host work that grows with the window: each slice's share of the slots wins
    dear = dataclasses.replace(WINDOW, host=(0.0005, 0.010))
    best = _best([SEQUENTIAL, dear], curve, machine, members=1, replicable=("pc-window",))[0]
    assert best.layout == Layout("pc-window", 64, 1, 8, 1, replicated=False)
    # without the option, no replicated layout is weighed
    assert not any(p.layout.replicated for p in _best([free], curve, machine, members=1))
    # 60 fields of 4 MiB a round, gathered at 2 GB/s: 0.13 s a round, far more than the
    # collective it saves
    lay = Layout("pc-window", 64, 1, 8, 1, replicated=True)
    big = predict(lay, free, curve, machine, 1, field_bytes=4 * 2**20)
    assert big.round_s == pytest.approx(0.005 + 0.0002 + 3e-3 + 60 * 4 * 2**20 / 2e9)


def test_a_replicated_window_cuts_the_members_points_evenly():
    curve = CostCurve((1, 100), (0.001, 0.1), (0.0, 0.0))  # 1 ms an item
    machine = Machine(ranks=4, ranks_per_node=4, cores=64, threads=1, latency=0.0)
    # 60 points of 3 members over 4 slices: 15 x 3 = 45 items on split slots, 45 replicated;
    # 61 points: 16 x 3 = 48 against 46
    odd = dataclasses.replace(WINDOW, calls=61.0 * 40, host=(0.0, 0.0))
    slots, whole = (predict(Layout("pc-window", 64, 1, 4, 3, rep), odd, curve, machine, 3)
                    for rep in (False, True))
    assert slots.round_s == pytest.approx(0.048) and whole.round_s == pytest.approx(0.046)


def test_layouts_divide_the_ranks_and_fit_the_points():
    short = Profile("window", 3, 0.1, 10, 30.0, (3,), (0.0,), 2)
    pairs = layouts([SEQUENTIAL, short], ranks=6, members=4, batches=(1, 2, 4, 8))
    slices = {(lay.method, lay.time_slices) for lay, _ in pairs}
    assert slices == {("sequential-sde", 1), ("window", 1), ("window", 2), ("window", 3)}
    # a group of the 6 sequential groups gets at most one member: batches of one
    assert {lay.batch for lay, _ in pairs if lay.groups == 6} == {1}


def _small(tmp_path, **extra):
    sets = {"model.shape": [8, 8], "sampler.steps": 60, "sampler.block_size": 20,
            "sampler.tol": "auto", "ensemble.members": 2, "ensemble.batch_size": 2,
            "calibrate.members": 2, "output.path": str(tmp_path / "auto.zarr")}
    sets.update(extra)
    return sets


def test_a_plan_on_one_rank_does_not_name_a_window_split(tmp_path, capsys):
    """One time slice holds the whole window whichever split is set: the use line leaves
    the setting out rather than ask for one that changes nothing."""
    sets = _small(tmp_path, **{"sampler.method": "pc-window", "sampler.window": 16,
                               "model.emulate_ms": [5, 0]})  # batching pays: a window wins
    args = ["plan", "jobs/configs/grf.toml", "--ranks", "1"]
    assert main(args + sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])) == 0
    use = [line for line in capsys.readouterr().out.splitlines() if line.startswith("use: ")]
    assert len(use) == 1 and "sampler.method='pc-window'" in use[0]
    assert "parallel.time_slices=1" in use[0] and "window_split" not in use[0]


def test_plan_command_prints_a_ranked_table_and_the_settings(tmp_path, capsys):
    # a job's config (2 time slices) planned from a login node's single process
    sets = _small(tmp_path, **{"sampler.method": "auto", "parallel.time_slices": 2})
    out = tmp_path / "plan.json"
    args = ["plan", "jobs/configs/grf.toml", "--ranks", "2", "--json", str(out)]
    assert main(args + sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])) == 0
    printed, err = capsys.readouterr()
    # the plan on stdout, what was measured on the way on stderr
    assert "predicted_s" in printed and "use: --set sampler.method=" in printed
    assert "plan: " in err
    assert "predicted_s" not in err and "use: " not in err
    table = json.loads(out.read_text())
    predicted = [row["predicted_s"] for row in table["layouts"]]
    assert predicted == sorted(predicted)
    methods = {row["method"] for row in table["layouts"]}
    assert methods == {"sequential-sde", "piadm-sde", "window", "pc-window"}
    assert table["settings"]["sampler.method"] == table["layouts"][0]["method"]


def test_a_sampler_whose_calibration_cannot_fit_is_left_out_of_the_plan(
        tmp_path, capsys, monkeypatch):
    """window's calibration batch (12 buffers at 60 points, 2 members of 8x8) needs 360 KiB,
    pc-window's with the learned corrector (11 buffers) 330 KiB: with 345 KiB the plan goes
    on without window at 60 points. Each width is calibrated at its own: a narrower window
    that fits stays in the plan."""
    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))  # calibrated anew
    monkeypatch.setattr("pipeline.memory_check.available_bytes",
                        lambda device, sharing=1: (345 * 2**10, "available on this node's host"))
    sets = _small(tmp_path, **{"sampler.method": "auto"})
    out = tmp_path / "plan.json"
    args = ["plan", "jobs/configs/grf.toml", "--ranks", "1", "--json", str(out)]
    assert main(args + sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])) == 0
    err = capsys.readouterr().err
    assert "left out window p=60: config: 2 members calibrating window" in err
    assert "profiled window          p=50" in err  # the narrower one, calibrated at its own
    kept = {(row["method"], row["param"]) for row in json.loads(out.read_text())["layouts"]}
    assert ("window", 60) not in kept and ("pc-window", 60) in kept
    # a named sampler stops only for its own width, not for one the plan tried beside it
    named = _small(tmp_path, **{"sampler.method": "window", "sampler.window": 30,
                                "parallel.time_slices": "auto", "ensemble.members": 1,
                                "ensemble.batch_size": 1})
    assert main(args + sum((["--set", f"{k}={json.dumps(v)}"] for k, v in named.items()),
                           [])) == 0
    assert "left out window p=60: config: 2 members calibrating window" in \
        capsys.readouterr().err


@pytest.mark.parametrize("flags, needle", [(["--ranks", "0"], "plan: --ranks 0 must be >= 1"),
                                           (["--ranks", "2", "--rows", "0"],
                                            "plan: --rows 0 must be >= 1"),
                                           (["--ranks", "2", "--gpus-per-node", "-1"],
                                            "plan: --gpus-per-node -1 must be >= 0")])
def test_plan_rejects_counts_below_their_least(flags, needle, capsys):
    assert main(["plan", "jobs/configs/grf.toml", *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"piadm: error: {needle}"


def test_plan_refuses_parallel_items_past_the_selection_as_the_run_does(capsys):
    """An unconditional config has one item: [0, 1] was planned as two, exit 0."""
    assert main(["plan", "jobs/configs/grf.toml", "--ranks", "2", "--set",
                 "parallel.items=[0, 1]"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "piadm: error: config: parallel.items [0, 1] goes past the 1 items of the input "
        "selection: use indices 0 .. 0")


def test_a_gpu_plan_made_without_a_gpu_says_whose_costs_it_has(tmp_path, capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU here: the plan's costs are a GPU's")
    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    sets = _small(tmp_path, **{"sampler.method": "sequential-sde"})
    assert main(["plan", "jobs/configs/grf.toml", "--ranks", "2", "--gpus-per-node", "2",
                 *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])]) == 0
    assert ("plan: this machine has no GPU: the cost of a model call is measured on its CPU, "
            "not on a GPU") in capsys.readouterr().err


def test_a_plan_never_gives_a_picard_ode_more_time_slices_than_corrector_steps(
        tmp_path, capsys, monkeypatch):
    """16 ranks, blocks of 20 and 40 points, and 8 corrector steps: the run would refuse 16
    time slices (each needs a corrector step), so the plan must not offer them."""
    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    sets = _small(tmp_path, **{"sampler.method": "piadm-ode", "parallel.time_slices": "auto",
                               "sampler.tol": 1e-3, "ensemble.members": 1,
                               "ensemble.batch_size": 1, "model.emulate_ms": [5, 1]})
    out = tmp_path / "plan.json"
    assert main(["plan", "jobs/configs/grf.toml", "--ranks", "16", "--json", str(out),
                 *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])]) == 0
    rows = json.loads(out.read_text())["layouts"]
    assert max(row["time_slices"] for row in rows if row["method"] == "piadm-ode") == 8


def test_auto_sampling_runs_the_plan_and_records_it_and_a_resume_keeps_it(tmp_path, capsys):
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "sampler.method": "auto", "parallel.time_slices": "auto"}))
    summary = sample(cfg)
    assert summary.members == 2
    chosen = json.loads(xr.open_zarr(summary.path).attrs["plan_settings"])
    assert chosen["sampler.method"] in ("sequential-sde", "piadm-sde", "window", "pc-window")
    assert chosen["parallel.time_slices"] == 1  # one rank here
    attrs = xr.open_zarr(summary.path).attrs
    assert attrs["sampler_method"] == chosen["sampler.method"]
    assert attrs["sampler_tol_source"] == ("plan" if "sampler.tol" in chosen else "unused")
    assert "plan: " in capsys.readouterr().err
    again = sample(cfg)  # resumes: the store's own choice, nothing left to sample
    assert again.members == 0 and again.skipped == 2
    assert "the store's own choice" in capsys.readouterr().err


def test_a_resumed_auto_run_takes_a_batch_size_the_config_changed_since_the_plan(
        tmp_path, capsys):
    """The plan's batch size is not the store's identity: after running out of memory a user
    lowers ensemble.batch_size, and the resumed "auto" run (and its dry run) samples at it;
    a config that asks what it asked when the plan was made keeps the plan's."""
    import zarr

    # j_max: the learned corrector's transforms, a call per member, make one member a batch
    # the fastest plan for this cheap model, and then there is nothing to lower
    sets = _small(tmp_path, **{"sampler.method": "auto", "ensemble.members": 4,
                               "ensemble.batch_size": 4, "sampler.theta": "j_max"})
    sample(load_config("jobs/configs/grf.toml", sets))
    path = sets["output.path"]
    attrs = zarr.open_group(path, mode="r").attrs
    planned = json.loads(attrs["plan_settings"])["ensemble.batch_size"]
    assert attrs["plan_batch_size_asked"] == 4 and planned > 1  # else nothing to lower
    zarr.open_group(path, mode="r+")["done"][0, :] = 0  # as if it ran out of memory at once
    capsys.readouterr()
    lower = {**sets, "ensemble.batch_size": 1}
    args = ["sample", "jobs/configs/grf.toml", "--dry-run",
            *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in lower.items()), [])]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"batches of up to {planned} (1 member(s) a call" in err
    summary = sample(load_config("jobs/configs/grf.toml", lower))
    err = capsys.readouterr().err
    assert summary.members == 4 and "the config's (it asked 4 when the plan was made)" in err
    zarr.open_group(path, mode="r+")["done"][0, :] = 0
    sample(load_config("jobs/configs/grf.toml", sets))  # asks 4 again: the plan's size
    assert "the config's (it asked" not in capsys.readouterr().err


def test_a_resumed_auto_run_takes_time_slices_that_fit_the_ranks_it_has(tmp_path, capsys):
    """The layout is not the store's identity: an "auto" store planned on 2 time slices
    resumes on 1 rank (the most slices below the plan's that divide the ranks), or on the
    time slices the config names; a dry run on 4 ranks shows the plan's layout, 2 x 2."""
    import zarr

    sets = _small(tmp_path, **{"sampler.method": "auto", "parallel.time_slices": "auto"})
    sample(load_config("jobs/configs/grf.toml", sets))
    group = zarr.open_group(sets["output.path"], mode="r+")
    plan = {**json.loads(group.attrs["plan_settings"]), "parallel.time_slices": 2}
    group.attrs["plan_settings"] = json.dumps(plan)  # as if planned for 2 ranks
    group["done"][0, :] = 0
    capsys.readouterr()
    assert sample(load_config("jobs/configs/grf.toml", sets)).members == 2
    assert "plan: on 1 time slice(s) of the 1 ranks (the plan's 2 do not divide them)" in (
        capsys.readouterr().err)
    from types import SimpleNamespace

    from pipeline.dry_run import dry_run

    four = SimpleNamespace(world=SimpleNamespace(size=4), groups=1, slices=SimpleNamespace(size=4))
    text, runs = dry_run(load_config("jobs/configs/grf.toml", sets), four)  # on 4 ranks
    assert runs and "ranks      4 = 2 group(s) x 2 time slice(s)" in text
    assert f"{plan['sampler.method']}, " in text and "from the store's plan" in text
    group["done"][0, :] = 0
    named = {**sets, "parallel.time_slices": 1}
    assert sample(load_config("jobs/configs/grf.toml", named)).members == 2
    assert "(the config's)" in capsys.readouterr().err


def test_a_planned_store_of_a_named_method_is_grown_by_an_auto_method_config(
        tmp_path, capsys, monkeypatch):
    """A store planned for a named method (its time slices "auto") is taken with its plan by
    the same config with sampler.method = "auto", at more members too: the plan's window was
    named as the difference (as 'sampler.window: 32 -> 0') and the growth refused, though the
    same members were resumed."""
    from pipeline import planner

    sets = _small(tmp_path, **{"sampler.method": "pc-window", "parallel.time_slices": "auto"})
    sample(load_config("jobs/configs/grf.toml", sets))
    plan = xr.open_zarr(sets["output.path"]).attrs["plan_settings"]
    monkeypatch.setattr(planner, "profile", lambda *a, **k: 1 / 0)  # the store's plan: no other
    capsys.readouterr()
    grown = {**sets, "sampler.method": "auto", "ensemble.members": 4}
    summary = sample(load_config("jobs/configs/grf.toml", grown))
    assert summary.members == 2 and summary.skipped == 2
    assert "the store's own choice" in capsys.readouterr().err
    assert xr.open_zarr(sets["output.path"]).attrs["plan_settings"] == plan


def test_a_dry_run_of_an_auto_run_names_the_planner_and_then_the_store_it_would_resume(
        tmp_path, capsys):
    sets = _small(tmp_path, **{"sampler.method": "auto"})
    args = ["sample", "jobs/configs/grf.toml", "--dry-run",
            *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "sampler    auto: the planner picks the method" in err and "would be created" in err
    assert "the planner may pick another batch size" in err
    # grf.toml sets parallel.time_slices = 1, which the plan keeps: not said to be picked
    assert "and its window (on the 1 time slice(s) set)" in err
    assert "time slices: the planner picks them" not in err
    sample(load_config("jobs/configs/grf.toml", sets))
    capsys.readouterr()
    assert main(args) == 0
    assert "would be resumed: 2 of 2 members done" in capsys.readouterr().err


def test_a_tolerance_the_planner_calibrated_is_recorded_as_the_plans(tmp_path):
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "sampler.method": "pc-window", "sampler.tol": "auto", "parallel.time_slices": "auto"}))
    attrs = xr.open_zarr(sample(cfg).path).attrs
    assert json.loads(attrs["plan_settings"])["sampler.tol"] == attrs["sampler_tol"]
    assert attrs["sampler_tol_source"] == "plan"


def test_a_plans_settings_name_how_its_time_slices_share_the_window():
    from pipeline.plan import Prediction
    from pipeline.planner import settings

    def chosen(lay):
        return settings(Prediction(lay, WINDOW, 1.0, 1, 0.025))

    assert chosen(Layout("pc-window", 64, 1, 4, 1, True))["sampler.window_split"] == "replicated"
    assert chosen(Layout("pc-window", 64, 1, 4, 1))["sampler.window_split"] == "slots"
    # the setting means nothing to other samplers: the config's stays
    piadm = Profile("piadm-sde", 50, 1e-3, 40, 2400.0, (8, 60), (0.0, 0.0), 2)
    assert "sampler.window_split" not in settings(
        Prediction(Layout("piadm-sde", 50, 1, 4, 1), piadm, 1.0, 1, 0.025))


def test_auto_time_slices_keep_the_named_sampler(tmp_path):
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "sampler.method": "window", "sampler.tol": 0.1, "parallel.time_slices": "auto"}))
    summary = sample(cfg)
    chosen = json.loads(xr.open_zarr(summary.path).attrs["plan_settings"])
    assert chosen["sampler.method"] == "window" and chosen["parallel.time_slices"] == 1


def test_a_run_held_to_its_time_slices_says_what_auto_time_slices_would_gain(
        tmp_path, monkeypatch):
    """`piadm plan` weighs every time-slice count; an "auto" run with the default
    parallel.time_slices = 1 weighs one: it says when the plan's table holds a layout
    predicted more than 10% faster on other time slices, and keeps to its own."""
    from pipeline import planner

    curve = CostCurve((1, 8, 64), (0.005, 0.005, 0.040), (0.0, 0.0, 0.0))
    machine = Machine(ranks=8, ranks_per_node=8, cores=64, threads=1, latency=1e-5)
    ranked = _best([SEQUENTIAL, WINDOW], curve, machine, members=1)
    sequential = next(p for p in ranked if p.layout.method == "sequential-sde")
    monkeypatch.setattr(planner, "make_plan",
                        lambda *a, **k: Plan(ranked, sequential, machine))
    one_slice = next(p.seconds for p in ranked if p.layout.time_slices == 1)
    for slices, chosen, hint in [
            (1, 1, 'plan: parallel.time_slices = "auto" would allow 1 group x 8 time slices, '
                   f"predicted {ranked[0].seconds:.2f} s "
                   f"({one_slice / ranked[0].seconds:.2f}x faster)"),
            ("auto", 8, None)]:
        cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
            "sampler.method": "auto", "parallel.time_slices": slices}))
        said = []
        _, attrs = planner.planned_config(cfg, None, "cpu", ranks=8, gpus_per_node=0,
                                          latency=1e-5, stored=None, say=said.append)
        assert json.loads(attrs["plan_settings"])["parallel.time_slices"] == chosen
        assert [line for line in said if "would allow" in line] == ([hint] if hint else [])
    # other time slices 1.05 times faster than one: within 10%, no hint
    close = sorted((dataclasses.replace(p, seconds=max(p.seconds, one_slice / 1.05))
                    if p.layout.time_slices > 1 else p for p in ranked), key=lambda p: p.seconds)
    monkeypatch.setattr(planner, "make_plan",
                        lambda *a, **k: Plan(close, sequential, machine))
    said = []
    planner.planned_config(load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "sampler.method": "auto"})), None, "cpu", ranks=8, gpus_per_node=0, latency=1e-5,
        stored=None, say=said.append)
    assert said and not [line for line in said if "would allow" in line]


def test_auto_quality_weighs_every_sampler_at_the_steps_that_reach_the_same_w2(tmp_path, capsys):
    """sampler.method = "auto-quality": each sequential sampler runs at the fewest steps whose
    exact W2 reaches sequential-ode's at sampler.steps, and the plan says which steps to run."""
    from models.grf import GaussianRandomField
    from pipeline.grids import make_grid
    from pipeline.quality import grf_w2

    sets = _small(tmp_path, **{"sampler.method": "auto-quality", "sampler.steps": 100})
    out = tmp_path / "plan.json"
    args = ["plan", "jobs/configs/grf.toml", "--ranks", "2", "--json", str(out)]
    assert main(args + sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])) == 0
    assert "equal quality: sequential-ode at 100 steps has W2" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    steps = {row["method"]: row["steps"] for row in doc["layouts"]}
    assert steps["sequential-ode"] == 100 and steps["dpmpp-2m-window"] == steps["dpmpp-2m"]
    model = GaussianRandomField((8, 8))
    w2 = lambda method, n: grf_w2(model, method, make_grid(  # noqa: E731
        "ou", n, u_min=1e-3, u_max=10.0, block_size=n))
    target = w2("sequential-ode", 100)
    for method in ("dpmpp-2m", "edm-heun"):  # the fewest steps: reached there, not before
        assert w2(method, steps[method]) <= target < w2(method, steps[method] - 1)
    assert steps["dpmpp-2m"] < 30  # second order: far fewer steps at the same W2
    best = doc["layouts"][0]
    assert doc["settings"]["sampler.steps"] == best["steps"]


def test_an_emulated_model_is_profiled_through_its_waits_and_anew_for_another_latency(
        tmp_path, monkeypatch):
    """Profiles time the host work as it runs between an emulated device's waits (each call
    waits its emulated time, up to a cap); a checkpoint's digest does not hold the emulated
    latency, so the profile's cache key does."""
    import time

    from models import build_model
    from models.emulate import Emulated
    from pipeline import planner, profiling
    from pipeline.cache import read_cache

    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "model.emulate_ms": [20, 0], "sampler.method": "pc-window", "sampler.window": 8,
        "sampler.tol": 1e-3}))
    run_one, profiled = profiling._run_one, []
    monkeypatch.setattr(profiling, "_run_one",
                        lambda c, model, *a: profiled.append(model) or run_one(c, model, *a))
    planner.make_plan(cfg, build_model(cfg.model), "cpu", ranks=1, say=lambda *_: None)
    assert profiled and all(isinstance(model, Emulated) for model in profiled)

    def timed_profile(latency_ms):
        mine = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
            "model.emulate_ms": [latency_ms, 0], "sampler.tol": 1e-3}))
        start = time.perf_counter()
        prof = profiling.profile(mine, build_model(mine.model), "pc-window", 8, 1e-3, "cpu", 8,
                               "a checkpoint's digest")
        return prof, time.perf_counter() - start

    prof, seconds = timed_profile(20)
    assert seconds >= prof.rounds * 0.020  # every model call waited
    assert 0 < prof.host[0] < 0.020  # and the waits are not host time
    entries = len(read_cache(profiling._profile_file()))
    again, seconds = timed_profile(40)  # the same digest, another latency: measured, not read
    assert seconds >= again.rounds * 0.040
    assert len(read_cache(profiling._profile_file())) == entries + 1


def test_an_emulated_model_is_profiled_without_sleeping_through_every_wait(tmp_path,
                                                                           monkeypatch):
    """A plan of an emulated model whose calls are long slept through every call of every
    profile and of the cost curve: 242 s to plan 8 members of `grf` 32x32 with emulate_ms
    [1, 5] at 200 steps. The path (rounds, calls) is the base model's, the host time is
    timed over a run cut short whose waits are capped, and the cost curve is the base model's
    timed calls lengthened to the emulated time, without sleeping."""
    import time

    import torch

    from models import build_model
    from pipeline import profiling
    from pipeline.profiling import cost_curve

    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(profiling, "TIMED_SECONDS", 0.0)  # cut once TIMED_LEAST intervals ran
    monkeypatch.setattr(profiling, "TIMED_LEAST", 3)
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)  # what would be slept, not sleeping it
    at = lambda **more: load_config("jobs/configs/grf.toml", _small(  # noqa: E731
        tmp_path, **{"sampler.tol": 1e-3, **more}))
    slow, plain = at(**{"model.emulate_ms": [2000, 0]}), at()
    profile = lambda cfg, digest: profiling.profile(  # noqa: E731
        cfg, build_model(cfg.model), "pc-window", 8, 1e-3, "cpu", 8, digest)
    emulated, exact = profile(slow, "a"), profile(plain, "b")
    assert (emulated.rounds, emulated.calls, emulated.calls_by_size) == \
        (exact.rounds, exact.calls, exact.calls_by_size) and emulated.rounds > 4
    # the run cut short: three calls, the host work after each timed up to the fourth's start
    assert len(slept) == 3 and max(slept) <= profiling.TIMED_WAIT and emulated.host[0] > 0
    curve = cost_curve(build_model(slow.model), (8, 8), torch.float32, "cpu", [1, 4], 1)
    assert len(slept) == 3 and curve.sizes == (1, 4) and min(curve.wall) >= 2.0
    assert max(curve.busy) < 2.0  # the base model's CPU time, not the wait


def test_an_emulated_models_host_time_timed_on_a_run_cut_short_is_the_whole_runs(
        tmp_path, monkeypatch):
    """Timed over the first calls of a run cut short, a round's host time is what the whole
    run through the waits gives, (wall - the calls' time) / rounds, within the noise."""
    from models import build_model
    from pipeline import profiling

    monkeypatch.setattr(profiling, "TIMED_SECONDS", 0.0)  # cut after TIMED_LEAST intervals
    monkeypatch.setattr(profiling, "TIMED_LEAST", 4)
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "sampler.tol": 1e-3, "model.emulate_ms": [5, 0], "sampler.theta": "j_max"}))
    model = build_model(cfg.model)
    cut, whole = [], []
    for _ in range(3):
        stats, host, _, _ = profiling._run_one(cfg, model, "pc-window", 8, 1e-3, "cpu", 60)
        cut.append(host)
        whole.append(profiling._sample(cfg, model, "pc-window", 8, 1e-3, "cpu", 60, 1)[1])
    assert stats.rounds > 3 * profiling.TIMED_LEAST  # it was cut short
    assert 1 / 3 < min(cut) / min(whole) < 3


def test_a_profile_is_read_back_on_the_same_machine_kind_and_measured_again_on_another(
        tmp_path, monkeypatch):
    """A cache in a home folder is shared by a login node and compute nodes: a profile's host
    times are the machine's, so another CPU (or GPU, or thread count) measures its own."""
    from models import build_model
    from pipeline import profiling

    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{"sampler.tol": 1e-3}))
    model = build_model(cfg.model)
    run_one, runs = profiling._run_one, []
    monkeypatch.setattr(profiling, "_run_one", lambda *a: runs.append(1) or run_one(*a))
    profile = lambda: profiling.profile(cfg, model, "pc-window", 8, 1e-3, "cpu", 8, "digest")  # noqa: E731
    profile()
    measured = len(runs)
    profile()
    assert len(runs) == measured  # the same machine: read back
    monkeypatch.setattr(profiling, "machine_kind", lambda device: "another CPU x1")
    profile()
    assert len(runs) == 2 * measured  # another machine kind: measured again
    assert "x" in profiling.machine_kind("cpu").rsplit(" ", 1)[-1]


def test_a_profile_measures_how_its_host_time_grows_with_the_batch_once_per_batch(
        tmp_path, monkeypatch):
    """The keyed noise is drawn per member and step: a plan of large batches of a cheap
    model is mostly host time, which one member's run cannot show."""
    from models import build_model
    from pipeline import profiling

    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    # a field whose per-member work (its draws, its updates) outweighs a step's fixed cost
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{"model.shape": [32, 32]}))
    model = build_model(cfg.model)
    run_one, runs = profiling._run_one, []
    monkeypatch.setattr(profiling, "_run_one",
                        lambda *a: runs.append(a[7] if len(a) > 7 else 1) or run_one(*a))
    def profile(batch):
        return profiling.profile(cfg, model, "sequential-sde", 0, None, "cpu", 1, "digest",
                               batch=batch)

    one = profile(1)
    assert runs == [1] and (one.host_batch, one.host_growth) == (1, 1.0)
    many = profile(16)
    assert runs == [1, 16]  # one member's profile read back, the batch's growth measured
    assert many.host_batch == 16 and many.host_growth > 1.5
    assert many.batch_rounds == many.rounds == 60  # a sequential batch: a round a step
    assert many.host_at(1, 16) > 1.5 * many.host_at(1, 1)
    assert profile(16).host_growth == many.host_growth and runs == [1, 16]  # read back


def test_the_plan_times_the_model_with_the_threads_the_run_gives_a_rank(tmp_path, monkeypatch):
    """A small field runs on one torch thread (``layout.cpu_threads``): timed on the node's
    share instead, a call cost 24 ms where the run's takes 0.1, and the plan put a parallel
    sampler 70x ahead of a sequential one that the run found faster."""
    from models import build_model
    from pipeline import planner

    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    timed = []
    curve = planner.cost_curve
    monkeypatch.setattr(planner, "cost_curve",
                        lambda *a, **k: timed.append(a[5]) or curve(*a, **k))
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "sampler.method": "pc-window", "sampler.window": 8, "sampler.tol": 1e-3}))
    plan = planner.make_plan(cfg, build_model(cfg.model), "cpu", ranks=1, say=lambda *_: None)
    assert timed == [1] and plan.machine.threads == 1  # 8x8 points: one thread
    assert planner.machine_for(1, 0, "cpu", field_points=64 * 64).threads == 4  # as the run


def test_an_auto_plan_leaves_out_a_sampler_that_cannot_reach_the_distance(tmp_path, capsys):
    """On an H200 one sampler's calibration fell short (TF32 rounding) and the whole plan, and
    every auto run after it, stopped: the planner now weighs the samplers that can be used,
    and the shortfall is kept so that the next command says it without measuring again."""
    sets = _small(tmp_path, **{"sampler.method": "auto", "sampler.distance": 1e-12,
                               "calibrate.ladder": [0.1, 0.01], "calibrate.members": 1})
    args = ["plan", "jobs/configs/grf.toml", "--ranks", "1", "--json", str(tmp_path / "p.json"),
            *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])]
    assert main(args) == 0
    err = capsys.readouterr().err
    left = [line for line in err.splitlines() if "left out " in line]
    for method in ("piadm-sde", "window", "pc-window"):  # each width it weighs
        assert any(f"left out {method} p=" in line for line in left)
    # (a block of 40 of these 60 steps diverges, at a sequential sampler's cost: left out too)
    assert all(": calibrate: no tolerance in calibrate.ladder" in line
               or "piadm-sde's Picard blocks diverged" in line for line in left)
    assert err.count("calibrating ") == len(left)
    table = json.loads((tmp_path / "p.json").read_text())
    assert {row["method"] for row in table["layouts"]} == {"sequential-sde"}
    assert main(args) == 0  # again: the shortfall is read, not measured
    err = capsys.readouterr().err
    assert "calibrating " not in err and err.count("(measured earlier") == len(left)
    # a named sampler that cannot reach the distance still stops the command
    named = [a.replace('sampler.method="auto"', 'sampler.method="window"') for a in args]
    assert main(named) == 2
    assert "calibrate: no tolerance in calibrate.ladder keeps window" in capsys.readouterr().err
    # and its dry run says so and exits as the run would (it exited 0: a pre-check passed)
    assert main(["sample", "jobs/configs/grf.toml", "--dry-run", *named[6:]]) == 2  # its --sets
    assert "tol auto: no tolerance of calibrate.ladder was close enough" in capsys.readouterr().err


def test_the_plan_leaves_out_layouts_whose_sampler_state_cannot_fit(tmp_path, monkeypatch, capsys):
    from pipeline.memory import sampler_floor

    room = 3 * 2**20
    for where in ("pipeline.planner", "pipeline.profiling"):  # the plan's, the growth run's
        monkeypatch.setattr(f"{where}.available_bytes",
                            lambda device, sharing=1: (room, "available on this node's host"))
    sets = _small(tmp_path, **{"sampler.method": "auto", "model.shape": [32, 32],
                               "ensemble.members": 16, "ensemble.batch_size": 16})
    args = ["plan", "jobs/configs/grf.toml", "--ranks", "2", "--json", str(tmp_path / "p.json"),
            *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])]
    assert main(args) == 0
    assert "layouts whose sampler state alone needs more than the 3.0 MiB" in (
        capsys.readouterr().err)
    rows = json.loads((tmp_path / "p.json").read_text())["layouts"]
    assert rows and all(sampler_floor(r["method"], r["param"] or 20, r["batch"], 4 * 32 * 32,
                                      r["time_slices"]) <= room for r in rows)
    # the sequential sampler holds one noise buffer per block point: its largest batch fits
    assert max(r["batch"] for r in rows if r["method"] == "sequential-sde") == 8


def test_a_plan_whose_sequential_sampler_cannot_fit_is_one_line(tmp_path, monkeypatch, capsys):
    """At 16 ranks of 32x32 fields the sequential sampler holds its 20 block points (80 KiB a
    member), pc-window with the J_max corrector on 16 time slices 2 points of 8 buffers
    (64 KiB): with 70 KiB a rank only the latter fits, and the plan has nothing to compare it
    with."""
    for where in ("pipeline.planner", "pipeline.profiling"):  # the plan's, the growth run's
        monkeypatch.setattr(f"{where}.available_bytes",
                            lambda device, sharing=1: (70 * 2**10, "available on this node's "
                                                       "host"))
    sets = _small(tmp_path, **{"sampler.method": "pc-window", "sampler.tol": 0.05,
                               "sampler.theta": "j_max", "model.shape": [32, 32],
                               "ensemble.members": 16})
    args = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])
    assert main(["plan", "jobs/configs/grf.toml", "--ranks", "16", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("piadm: error: plan: the sequential sampler's state, which every "
                          "layout is compared with, does not fit in the 0.1 MiB"), err
    assert err.endswith("run fewer than 16 ranks a node, or lower the field or "
                        "sampler.block_size"), err
    # sampled on one rank, "auto" weighs layouts of one time slice: none fits
    auto = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in
                {**sets, "sampler.method": "auto", "sampler.tol": 0.05}.items()), [])
    assert main(["sample", "jobs/configs/grf.toml", *auto]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("piadm: error: plan: no layout's sampler state fits in the"), err
    assert not (tmp_path / "auto.zarr").exists()


def test_a_stop_signal_while_an_auto_run_plans_ends_it_after_the_measurement_under_way(
        tmp_path, monkeypatch, capsys):
    """A SIGTERM (a SLURM time limit) during the start-up plan: the measurement under way
    finishes, the rest of the plan is not measured, and the run exits 75 with nothing
    written, as a stop during a calibration does."""
    import os
    import signal

    from pipeline import planner
    from pipeline.signals import EXIT_PREEMPTED

    profiled = []
    real = planner.profile

    def then_stopped(*args, **kwargs):
        profiled.append(args[2])
        if len(profiled) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: the run's stop request is set
        return real(*args, **kwargs)

    monkeypatch.setattr(planner, "profile", then_stopped)
    out = tmp_path / "a.zarr"
    sets = ["model.shape=[8, 8]", "sampler.steps=20", "sampler.tol=1e-2", "sampler.method=auto",
            "ensemble.members=2", f"output.path={out}"]
    try:
        assert main(["sample", "jobs/configs/grf.toml",
                     *sum((["--set", s] for s in sets), [])]) == EXIT_PREEMPTED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert len(profiled) == 1 and not out.exists()
    assert "stopped by a signal before sampling began" in capsys.readouterr().err


def test_an_auto_run_refuses_another_configurations_store_before_it_plans(tmp_path, monkeypatch,
                                                                        capsys):
    """No plan of the config could resume it: refused before the measurements, naming the
    user's own settings (not the plan's, which it named after planning)."""
    from pipeline import planner

    profiled = []
    monkeypatch.setattr(planner, "profile", lambda *a, **k: profiled.append(a) or 1 / 0)
    out = tmp_path / "s.zarr"
    sets = ["model.shape=[8, 8]", "sampler.steps=20", "sampler.tol=1e-2", "ensemble.members=2",
            f"output.path={out}"]
    run = lambda *more: main(["sample", "jobs/configs/grf.toml",  # noqa: E731
                              *sum((["--set", s] for s in [*sets, *more]), [])])
    assert run() == 0
    capsys.readouterr()
    assert run("sampler.method=auto", "sampler.steps=30") == 2
    err = capsys.readouterr().err
    assert "it differs in sampler.steps: 20 -> 30)" in err and not profiled
    assert run("sampler.method=auto") == 2  # only a plan's keys differ: named the same way
    assert "it differs in sampler.method: 'pc-window' -> 'auto')" in capsys.readouterr().err
    assert not profiled
    # an auto store asked for fewer members than it holds is its config's: said so, unplanned
    monkeypatch.undo()
    auto = ["sampler.method=auto", f"output.path={tmp_path / 'a.zarr'}"]
    assert run(*auto, "ensemble.members=4") == 0
    monkeypatch.setattr(planner, "profile", lambda *a, **k: profiled.append(a) or 1 / 0)
    capsys.readouterr()
    assert run(*auto) == 2 and not profiled
    assert "holds 4 members of this configuration and this run asks ensemble.members = 2" in \
        capsys.readouterr().err


def test_a_stop_asked_of_the_api_ends_an_auto_runs_planning(tmp_path, monkeypatch):
    from pipeline import api, planner

    profiled = []
    monkeypatch.setattr(planner, "profile", lambda *a, **k: profiled.append(a) or 1 / 0)
    out = tmp_path / "a.zarr"
    summary = api.sample({"model": {"shape": [8, 8]}, "sampler": {
        "steps": 20, "tol": 1e-2, "method": "auto"}, "ensemble": {"members": 2},
        "output": {"path": str(out)}}, stop=lambda: True)
    assert summary.preempted and not summary.began and not profiled and not out.exists()


def test_an_auto_store_of_another_config_is_refused_naming_the_users_change(monkeypatch):
    """Where only plan keys differ, the store's own pick of the method is not the user's
    change: the refusal names the window the user set, not 'piadm-sde' -> 'auto'."""
    from pipeline.config import load_config
    from pipeline.plan_store import check_unplannable_store
    from pipeline.store import StoreExists

    made = load_config("jobs/configs/grf.toml", ["sampler.method=piadm-sde"])  # the plan's pick
    monkeypatch.setattr("pipeline.plan_store.read_attrs", lambda path: {"config": made.text})
    now = load_config("jobs/configs/grf.toml", ["sampler.method=auto", "sampler.window=20"])
    with pytest.raises(StoreExists, match=r"differs in sampler.window: 0 -> 20\)") as err:
        check_unplannable_store(now)
    assert "sampler.method" not in str(err.value)


def test_a_profile_whose_sizes_repeat_is_measured_again_not_divided_by():
    """A profile edited by hand with its two host sizes equal reached a division by zero in
    the interpolation (a traceback from piadm plan); such an entry reads as none."""
    from pipeline.profiling import _valid_profile

    entry = {"rounds": 9, "calls": 20.0, "wall": 0.5, "host_points": [4, 65],
             "host": [1e-3, 2e-3], "collectives": 2, "grown": {},
             "calls_by_size": [[1, 1e-3], [65, 2e-2]]}
    assert _valid_profile(entry)
    assert not _valid_profile({**entry, "host_points": [65, 65]})
    assert not _valid_profile({**entry, "calls_by_size": [[65, 1e-3], [65, 2e-2]]})
    # a round and a call a member at least: 1e-9 calls showed as "0 calls a member"
    assert not _valid_profile({**entry, "calls": 1e-9})
    assert not _valid_profile({**entry, "rounds": 0.5})


def test_a_plan_without_sampler_tol_is_refused_before_it_measures(tmp_path, capsys):
    """The plan weighs windows, which stop on sampler.tol: without it the plan measured the
    other samplers first (minutes on a network) and then refused, naming a window."""
    config = tmp_path / "auto.toml"
    config.write_text('[model]\nshape = [8, 8]\n[sampler]\nmethod = "auto"\n')
    assert main(["config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "sampler.tol must be set for sampler.method = 'auto', whose plan weighs" in err


def test_a_named_samplers_plan_calibrates_its_configured_width_first(tmp_path, capsys):
    """A plan for a named sampler whose configured width has no tolerance in the ladder
    ends there: it calibrated the half width first (minutes on a network), then refused."""
    assert main(["plan", "jobs/configs/grf.toml", "--ranks", "2", "--set", "model.shape=[8, 8]",
                 "--set", "sampler.steps=40", "--set", "sampler.tol=\"auto\"", "--set",
                 "calibrate.members=2", "--set", "calibrate.ladder=[1.0]"]) == 2
    err = capsys.readouterr().err
    assert "no tolerance in calibrate.ladder keeps pc-window" in err
    assert "calibrating pc-window (window 40)" in err and "(window 32)" not in err


def test_sample_says_it_plans_before_the_plans_measurements(tmp_path, capsys):
    """An "auto" run's log opened with a minute of "profiled ..." lines and no word of what
    they were for; the run's own first line came after the plan."""
    assert main(["sample", "jobs/configs/grf.toml", "--set", "model.shape=[8, 8]", "--set",
                 "sampler.method=auto", "--set", "sampler.steps=40", "--set",
                 "ensemble.members=2", "--set", f"output.path={tmp_path / 'p.zarr'}"]) == 0
    err = capsys.readouterr().err
    planning = err.index("piadm sample: planning the run (sampler.method = 'auto'")
    assert planning < err.index("profiled sequential-sde")


def test_a_cached_equal_quality_entry_without_a_sampler_is_searched_again(tmp_path,
                                                                          monkeypatch):
    """An entry lacking one of the family's samplers (edited, or written before the family
    grew) read as that sampler out of reach: the plan left it out, unsaid. An edited entry's
    steps out of range are searched again too."""
    from models import build_model
    from pipeline import equal_quality, planner
    from pipeline.cache import read_cache, update_cache

    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "sampler.method": "auto-quality", "sampler.steps": 20}))
    model, said = build_model(cfg.model), []
    found = planner.quality_steps(cfg, model, "cpu", "digest", said.append)
    assert set(found) > {planner.QUALITY_REFERENCE, "dpmpp-2m"}
    path = tmp_path / "cache" / "quality_steps.json"
    (key, entry), = read_cache(path).items()

    class Searched(Exception):
        pass

    def searching(*args, **kwargs):
        raise Searched

    monkeypatch.setattr(equal_quality, "measure_for", searching)
    assert planner.quality_steps(cfg, model, "cpu", "digest", said.append) == found  # read
    update_cache(path, key, {k: v for k, v in entry.items() if k != "dpmpp-2m"})
    with pytest.raises(Searched):
        planner.quality_steps(cfg, model, "cpu", "digest", said.append)
    # steps past what a config may ask were refused as the config's sampler.steps on every
    # run; a reference at other steps than the config's is not this search's
    for edit in ({"dpmpp-2m": 10**9}, {planner.QUALITY_REFERENCE: 7}):
        update_cache(path, key, {**entry, **edit})
        with pytest.raises(Searched):
            planner.quality_steps(cfg, model, "cpu", "digest", said.append)


def test_a_plan_says_which_profiles_it_measured_and_which_it_read(tmp_path, monkeypatch):
    """Every plan said "profiled" of every setting, also of those read from the cache in a
    moment: a user could not tell a plan that measured from one that did not."""
    from models import build_model
    from pipeline import planner

    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    cfg = load_config("jobs/configs/grf.toml", _small(tmp_path, **{
        "sampler.method": "pc-window", "sampler.tol": 1e-3}))
    lines = lambda said: [s.split()[0] for s in said if " rounds, " in s]  # noqa: E731
    first, again = [], []
    planner.make_plan(cfg, build_model(cfg.model), "cpu", ranks=1, say=first.append)
    planner.make_plan(cfg, build_model(cfg.model), "cpu", ranks=1, say=again.append)
    measured = len(lines(first))
    assert measured > 1 and lines(first) == ["profiled"] * measured
    assert lines(again) == ["cached"] * measured


def test_a_job_whose_store_another_jobs_plan_made_meanwhile_takes_that_plan(
        tmp_path, capsys, monkeypatch):
    """Two jobs of one "auto" configuration submitted together each plan (neither finds a
    store), and may pick apart (timings); the one that lost the race to make the store was
    refused as "made by a different configuration", which it is not. It starts again on the
    store's plan now."""
    import zarr

    from pipeline import plan_store, planner
    from pipeline.config import with_settings
    from pipeline.store import ASKED

    sets = _small(tmp_path, **{"sampler.method": "auto", "sampler.tol": 0.01,
                               "ensemble.members": 4})
    real = planner.planned_config

    def picks(width):
        def planned(cfg, model, device, *, stored=None, **kw):
            if stored is not None:
                return real(cfg, model, device, stored=stored, **kw)
            chosen = {"sampler.method": "pc-window", "parallel.time_slices": 1,
                      "ensemble.batch_size": 2, "sampler.window": width,
                      "sampler.window_split": "slots"}
            return with_settings(cfg, chosen), {
                "plan_settings": json.dumps(chosen), "plan_config_sha256": cfg.store_digest,
                ASKED: cfg.ensemble.batch_size}
        return planned

    monkeypatch.setattr(planner, "planned_config", picks(16))
    sample(load_config("jobs/configs/grf.toml", sets))  # the job that made the store
    first = xr.open_zarr(sets["output.path"]).attrs["plan_settings"]
    zarr.open_group(sets["output.path"], mode="r+")["done"][0, 2:] = 0  # its last batch
    looks = iter(["planned before the store was there"])
    monkeypatch.setattr(planner, "stored_plan", lambda cfg: None if next(looks, None)
                        else plan_store.stored_plan(cfg))
    monkeypatch.setattr(planner, "check_unplannable_store", lambda cfg: None)  # none there
    monkeypatch.setattr(planner, "planned_config", picks(8))
    capsys.readouterr()
    args = ["sample", "jobs/configs/grf.toml",
            *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert ("was made meanwhile by another job of this configuration, on a plan of its own "
            "(plans made at once pick by timings): starting again on that plan") in err
    assert "the store's own choice" in err and "2 members written" in err
    assert xr.open_zarr(sets["output.path"]).attrs["plan_settings"] == first


def test_the_gpus_of_a_node_are_counted_by_the_ranks_that_hold_them(monkeypatch):
    """``torch.cuda.device_count()`` was taken for the node's GPUs: a job giving each task
    its own GPU (--gpus-per-task=1) shows each rank one, and its plan was made for one rank
    a node. The ranks on rank 0's node are asked which GPU each holds."""
    from pipeline import memory, planner
    from pipeline.comm import SerialComm

    class FourRanks(SerialComm):
        def allgather_object(self, obj):
            return [("node-a", "GPU-0"), ("node-a", "GPU-1"), ("node-a", "GPU-1"),
                    ("node-b", "GPU-0")]

    monkeypatch.setattr(memory, "gpu_identity", lambda device: "GPU-0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert planner.gpus_on_node(FourRanks(), "cuda:0") == 2
    assert planner.gpus_on_node(SerialComm(), "cpu") == 0


def test_a_candidate_width_narrower_than_the_named_time_slices_is_left_out_not_refused(
        tmp_path, capsys, monkeypatch):
    """A job's config on 3 time slices with blocks of 5: the plan's candidate half block (2
    points) was validated with the job's 3 slices, and the plan stopped with "time_slices = 3
    is more than the 2 points of sampler.block_size", naming a block size the user never set.
    It is profiled on one slice now, and no layout gives it more slices than it has points."""
    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    sets = _small(tmp_path, **{"sampler.method": "piadm-sde", "parallel.time_slices": 3,
                               "sampler.block_size": 5, "sampler.tol": 1e-3,
                               "ensemble.members": 1, "ensemble.batch_size": 1})
    out = tmp_path / "plan.json"
    assert main(["plan", "jobs/configs/grf.toml", "--ranks", "3", "--json", str(out),
                 *sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])]) == 0
    rows = json.loads(out.read_text())["layouts"]
    blocks = {row["param"] for row in rows if row["method"] == "piadm-sde"}
    assert 5 in blocks and min(blocks) < 3  # the narrow candidate was profiled ...
    assert all(row["param"] >= row["time_slices"] for row in rows  # ... and fits its slices
               if row["method"] == "piadm-sde")


def test_a_named_sampler_whose_one_member_cannot_fit_ends_the_plan_before_any_profile(
        tmp_path, monkeypatch, capsys):
    """At 2048 x 2048 the plan profiled the sequential sampler for 116 s, then refused the
    named pc-window's calibration; with a fixed tol it profiled for 20 s, then ran out of
    memory. The named sampler's own width is weighed first: one member's state must fit."""
    from pipeline.config import load_config
    from pipeline.memory import sampler_floor

    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    sets = _small(tmp_path, **{"sampler.method": "pc-window", "sampler.tol": 0.05})
    s = load_config("jobs/configs/grf.toml", [f"{k}={json.dumps(v)}" for k, v in sets.items()]
                    ).sampler
    one = sampler_floor("pc-window", 60, 1, 8 * 8 * 4, theta=s.theta)  # 60 of 60 steps
    monkeypatch.setattr("pipeline.memory_check.available_bytes",
                        lambda device, sharing=1: (one - 1, "available on this node's host"))
    args = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in sets.items()), [])
    assert main(["plan", "jobs/configs/grf.toml", "--ranks", "1", *args]) == 2
    err = capsys.readouterr().err
    assert "profiled" not in err and "cached" not in err  # nothing was profiled first
    assert err.strip().splitlines()[-1].startswith(
        "piadm: error: config: 1 member a batch of pc-window (60 points of sampler.window"), err
