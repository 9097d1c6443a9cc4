"""The ensemble store: conditional items, layout and provenance, resume after a stop, item
subsets filling one store, input validation before anything is written, ``piadm status``."""
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import scoringrules
import xarray as xr
import zarr

from conftest import conditional_sets, make_input
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.ensemble import sample_to_store
from pipeline.signals import StopRequest
from pipeline.done_record import done_members
from pipeline.store import StoreExists


def assert_same_store(a, b):
    x, y = xr.open_zarr(a), xr.open_zarr(b)
    assert set(x.data_vars) == set(y.data_vars)
    for name in x.data_vars:
        assert np.array_equal(x[name].values, y[name].values, equal_nan=True), name


def _overrides(sets):
    return [s for s in sets if s != "--set"]


class StopAfter(StopRequest):
    """A stop request that arrives after ``checks`` safe points (as a signal would)."""

    def __init__(self, checks):
        super().__init__()
        self.left = checks

    def __bool__(self):
        self.left -= 1
        return self.left < 0


def test_conditional_store_has_items_provenance_and_scores_with_crps(tmp_path, input_store):
    out = tmp_path / "ens.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]) == 0
    ds, truth = xr.open_zarr(out), xr.open_zarr(input_store, consolidated=False).vort
    assert ds.vort.dims == ("time", "member", "y", "x") and ds.vort.shape == (6, 6, 16, 16)
    assert (ds.time.values == truth.time.values).all()
    assert ds.member.attrs["standard_name"] == "realization" and ds.member.attrs["units"] == "1"
    for key in ("config", "config_sha256", "piadm_version", "sampler_method", "sampler_seed",
                "model_sha256", "history", "input_mean", "input_std"):
        assert key in ds.attrs, key
    assert len(np.unique(ds.seed.values)) == 36 and bool((ds.done == 1).all())
    # The ensemble is centred on its input: CRPS against it beats CRPS against a shifted truth.
    fc = ds.vort.transpose(..., "member").values
    crps = scoringrules.crps_ensemble(truth.values, fc, m_axis=-1).mean()
    shifted = scoringrules.crps_ensemble(truth.values + 3 * ds.attrs["input_std"], fc, m_axis=-1).mean()
    assert np.isfinite(crps) and crps < 0.5 * shifted


def test_a_stopped_run_resumes_to_the_uninterrupted_store(tmp_path, input_store, capsys):
    clean, cut = tmp_path / "clean.zarr", tmp_path / "cut.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, clean)]) == 0
    cfg = load_config("jobs/configs/grf.toml", _overrides(conditional_sets(input_store, cut)))
    # safe points: two before anything is written (before and after the tolerance is
    # settled), then one before each batch of 2 members
    summary = sample_to_store(cfg, stop=StopAfter(7))
    assert summary.preempted and summary.members == 10
    assert main(["status", str(cut)]) == 1
    assert "10/36 members done" in capsys.readouterr().out
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, cut)]) == 0
    assert "10 of 36 members done, 26 to sample" in capsys.readouterr().err
    assert main(["status", str(cut)]) == 0
    assert_same_store(clean, cut)
    history = json.loads(zarr.open_group(cut, mode="r").attrs["piadm_history"])
    assert history[-2].endswith("piadm stopped by a signal after 10 members")
    assert history[-1].endswith("piadm wrote 26 members (10 already written)")


# a window sampler's members do not depend on how many a call holds (a sequential one's move in
# the last bits, docs/store.md, "Resume and preemption"): the tests of other batch sizes run one
WINDOW = "sampler.method=pc-window"

def _same_members(a, b):
    """The same fields, seeds and done flags (rounds and calls are a call's, and differ)."""
    x, y = xr.open_zarr(a), xr.open_zarr(b)
    for name in ("vort", "seed", "done"):
        assert np.array_equal(x[name].values, y[name].values, equal_nan=True), name


def test_a_store_resumes_at_another_batch_size_in_its_own_batches(tmp_path, input_store, capsys,
                                                                   monkeypatch):
    """After running out of memory a user lowers ensemble.batch_size: the store made in
    batches of 2 resumes (the batch size is not its identity), its batches sampled a member a
    call, a stop may come between the calls, and a larger batch size resumes it too, its
    calls holding several of the store's batches; the members are those of an uninterrupted
    run."""
    clean, cut = tmp_path / "clean.zarr", tmp_path / "cut.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(input_store, clean, WINDOW)]) == 0
    cfg = load_config("jobs/configs/grf.toml",
                      _overrides(conditional_sets(input_store, cut, WINDOW)))
    assert sample_to_store(cfg, stop=StopAfter(3)).members == 2  # 2 safe points, 1 batch
    one = load_config("jobs/configs/grf.toml", _overrides(conditional_sets(
        input_store, cut, WINDOW, "ensemble.batch_size=1")))
    capsys.readouterr()
    # safe points: 2 before writing, then before each batch of 2 and between its 2 calls
    summary = sample_to_store(one, stop=StopAfter(5))
    assert summary.preempted and summary.members == 3  # the stop came between two calls
    assert ("2 of 36 members done, 34 to sample in its batches of 2 (1 member(s) a call: "
            "ensemble.batch_size)") in capsys.readouterr().err
    from pipeline import ensemble

    calls, sample = [], ensemble.sample_batch
    monkeypatch.setattr(ensemble, "sample_batch",
                        lambda model, noise, **kw: calls.append(noise.keys) or sample(
                            model, noise, **kw))
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(input_store, cut, WINDOW, "ensemble.batch_size=4")]) == 0
    # the 6 members of an item: member 5 left of item 0, then 0 .. 3 of item 1 from two of
    # its batches and 4, 5 (a call never holds two items)
    assert calls[:3] == [((0, 5),), tuple((1, m) for m in range(4)), ((1, 4), (1, 5))]
    assert ("5 of 36 members done, 31 to sample in its batches of 2 (up to 4 members a call, "
            "its batches together: ensemble.batch_size)") in capsys.readouterr().err
    _same_members(clean, cut)
    assert zarr.open_group(cut, mode="r").attrs["piadm_member_batch"] == 2


@pytest.mark.parametrize("edit", ["one field", "two fields swapped"])
def test_a_store_whose_input_changed_since_is_not_resumed(tmp_path, input_store, capsys, edit):
    """Input data regenerated or edited in place under a half-filled store: resuming would
    condition the rest of the members on other fields than the first. The run, and its dry
    run, refuse it, and the store is kept as it was."""
    out = tmp_path / "e.zarr"
    cfg = load_config("jobs/configs/grf.toml", _overrides(conditional_sets(input_store, out)))
    assert sample_to_store(cfg, stop=StopAfter(3)).members == 2
    data = zarr.open_group(input_store, mode="r+")["vort"]
    if edit == "one field":
        data[1] = 0.0
    else:  # the same values, so the same mean and std, in another order
        data[:2] = data[:2][::-1].copy()
    before = zarr.open_group(out, mode="r")["done"][:].copy()
    capsys.readouterr()
    args = ["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]
    assert main([*args, "--dry-run"]) == 2
    assert "and they have changed since" in capsys.readouterr().err
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "its members were conditioned on the vort fields" in err and "another output.path" in err
    assert np.array_equal(zarr.open_group(out, mode="r")["done"][:], before)
    # output.overwrite = true replaces it, as another configuration's, and then resumes it
    args += ["--set", "output.overwrite=true"]
    assert main([*args, "--dry-run"]) == 0
    assert "output.overwrite = true would replace it" in capsys.readouterr().err
    assert main(args) == 0
    assert ("store " + str(out) + " replaced (its input changed since it was made): 0 of 36 "
            "members done") in capsys.readouterr().err
    assert zarr.open_group(out, mode="r")["done"][:].all()
    assert main(args) == 0
    assert "resumed: 36 of 36 members done" in capsys.readouterr().err


def test_a_store_made_before_fingerprints_is_checked_by_its_inputs_statistics(
        tmp_path, input_store, capsys):
    """A store an older piadm made records no fingerprint of its input, only its mean and
    standard deviation: it was grown on regenerated input with no word. Refused now where
    they changed; resumed where the input is as it was."""
    out = tmp_path / "e.zarr"
    cfg = load_config("jobs/configs/grf.toml", _overrides(conditional_sets(input_store, out)))
    assert sample_to_store(cfg, stop=StopAfter(3)).members == 2
    group = zarr.open_group(out, mode="r+")
    del group.attrs["input_fingerprint"]  # as a piadm before it made it
    zarr.consolidate_metadata(str(out))
    args = ["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]
    data = zarr.open_group(input_store, mode="r+")["vort"]
    kept = data[:]
    data[1] = 2.0 * kept[1]
    capsys.readouterr()
    assert main(args) == 2
    assert "(mean " in capsys.readouterr().err  # names what it compared, then and now
    data[:] = kept
    assert main(args) == 0


def test_the_same_input_values_rechunked_or_widened_resume(tmp_path, input_store):
    """Harmless data maintenance (the same values in other chunks, or as float64) is the
    same input: the store resumes, whatever rounding a float32 mean in other chunks gives."""
    out = tmp_path / "e.zarr"
    cfg = load_config("jobs/configs/grf.toml", _overrides(conditional_sets(input_store, out)))
    assert sample_to_store(cfg, stop=StopAfter(3)).members == 2
    ds = xr.open_zarr(input_store, consolidated=False).load()
    for name in ds.variables:
        ds[name].encoding = {}
    for copy in (ds.chunk({"time": 1}), ds.astype("float64")):
        copy.to_zarr(input_store, mode="w", zarr_format=3, consolidated=False)
        assert main(["sample", "jobs/configs/grf.toml",
                     *conditional_sets(input_store, out, "ensemble.members=6")]) == 0
        zarr.open_group(out, mode="r+")["done"][1:] = 0  # left to do again


@pytest.mark.parametrize("offset", [0.0, 1e5])  # a vorticity's mean 0, and a large one
def test_a_fingerprint_tells_values_apart_to_rounding_and_not_their_layout(offset):
    from pipeline.inputs import fingerprint, same_fingerprint

    def of(fields):  # fields (items, 8, 8), float64, summed as a chunked reader might
        flat = fields.reshape(len(fields), -1)
        ramp = np.linspace(-1.0, 1.0, flat.shape[1])
        return fingerprint(np.stack([flat.mean(1), np.sqrt((flat**2).mean(1)),
                                     (flat * ramp).mean(1)], axis=1))

    rng = np.random.default_rng(0)
    fields = rng.standard_normal((50, 8, 8))
    fields = (fields - fields.mean(axis=(1, 2), keepdims=True) + offset).astype("float32")
    wide = fields.astype("float64")
    base = of(wide)  # the same values in other chunks: test_the_same_input_values_rechunked...
    nudged = wide.copy()
    nudged[7, 3, 2] += 0.1  # one value of 3200, by a tenth of the spread
    for other in (nudged, wide[[1, 0, *range(2, 50)]], wide[:, ::-1, :],
                  np.roll(wide, 1, axis=2)):  # a value, two items swapped, a flip, a shift
        assert not same_fingerprint(base, of(other))


def test_a_batch_taken_over_samples_only_the_members_its_dead_claimant_did_not_write(
        tmp_path, input_store):
    """What a group found left at start-up may be stale: a job that held the batch wrote part
    of it, then died. Once claimed, the batch is read again, and only the rest is sampled."""
    import io

    from pipeline.comm import SerialComm
    from pipeline.claimed import claimed_calls
    from pipeline.run_end import Tally
    from pipeline.progress import Progress

    out = tmp_path / "e.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]) == 0
    zarr.open_group(out, mode="r+")["done"][0, 1] = 0  # as if the claimant died after member 0
    items = type("I", (), {"dim": "time", "labels": ["t0"]})()
    bar = Progress(SerialComm(), 2, "members", stream=io.StringIO())
    calls = list(claimed_calls([(0, (0, 1), (0, 1))], 2, SerialComm(), False, Tally(0.0),
                               bar, items, out, "job-x"))
    assert calls == [(0, (1,))] and bar.done == 1


def test_a_job_whose_batch_was_taken_over_writes_no_more_of_it(tmp_path, input_store):
    """A live job whose heartbeat looked dead loses its claim; its next write into the
    batch's chunks (a part-chunk write) would race the new holder's, so it stops instead."""
    from pipeline.done_record import BatchTaken, write_batch

    out = tmp_path / "e.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]) == 0
    group = zarr.open_group(out, mode="r+")
    group["done"][0, 0] = 0
    before = group["vort"][0, 0]
    with pytest.raises(BatchTaken, match="another job took over the batch of item index 0"):
        write_batch(out, variable="vort", item=0, start=0, field=np.zeros((1, 16, 16), "f4"),
                    seed=np.zeros(1), rounds=1, model_calls=1, owned=lambda: False)
    assert np.array_equal(group["vort"][0, 0], before) and group["done"][0, 0] == 0


@pytest.mark.parametrize("batches, size, calls", [
    ([(0, (0, 1, 2, 3))], 4, [(0, (0, 1, 2, 3))]),
    ([(0, (0, 1, 2, 3))], 3, [(0, (0, 1, 2)), (0, (3,))]),
    ([(0, (0, 1)), (0, (2, 3)), (0, (4,))], 4, [(0, (0, 1, 2, 3)), (0, (4,))]),  # batches join
    ([(0, (1,)), (0, (2, 3)), (0, (5,))], 8, [(0, (1, 2, 3, 5))]),  # gaps: written apart
    ([(0, (0, 1)), (1, (0, 1))], 4, [(0, (0, 1)), (1, (0, 1))]),  # a call holds one item
    ([(0, (0, 1)), None, (0, (4, 5))], 4, [(0, (0, 1)), (0, (4, 5))]),  # none held in a wait
    ([], 2, []),
])
def test_cut_calls_fill_calls_of_size_from_the_batches_of_one_item(batches, size, calls):
    from pipeline.work import cut_calls

    assert list(cut_calls(iter(batches), size)) == calls


def test_cut_calls_claim_a_batch_only_when_a_call_needs_it():
    from pipeline.work import cut_calls

    pulled = []

    def batches():
        for b in [(0, (0, 1)), (0, (2, 3)), (0, (4, 5))]:
            pulled.append(b)
            yield b

    calls = cut_calls(batches(), 2)
    assert next(calls) == (0, (0, 1)) and len(pulled) == 1


@pytest.mark.parametrize("call, unit, runs", [
    ((0, 1, 2, 3), 4, [(0, 4)]),
    ((0, 1, 2, 3), 2, [(0, 2), (2, 4)]),  # one region per store batch: each its own claim
    ((1, 2, 3, 4, 6, 7), 2, [(0, 1), (1, 3), (3, 4), (4, 6)]),
    ((1, 2, 5, 6, 7), 8, [(0, 2), (2, 5)]),  # a gap in one batch: two regions
])
def test_write_runs_are_consecutive_members_of_one_store_batch(call, unit, runs):
    from pipeline.work import write_runs

    assert write_runs(call, unit) == runs


def test_the_older_digest_is_the_one_piadm_gave_before_the_batch_size_left_it():
    """Measured with the code of 05e67cf (the last whose digest counted the batch size):
    load_config("jobs/configs/grf.toml").store_digest there. A setting added since changes
    every store's digest, this one's too: then this pin says older stores are no longer
    recognised. grf.toml took sampler.theta = "secant" since: its theta then was the default."""
    cfg = load_config("jobs/configs/grf.toml", ["sampler.theta=j_max"])
    assert cfg.legacy_store_digest(4) == \
        "d753ba209bb4fe37a0620f520fee342a414d2faed995dd8ec771bcc24ac91c92"
    assert cfg.legacy_store_digest(2) == \
        "b6a170c80cccd198829a6728dbaeff1ff0f6dc20d505c91c9cc167fb7e93621a"


def _older_auto_store(tmp_path):
    """An "auto" store as an older piadm left it (its config asked batch size 4), members
    left to sample; returns (the sample arguments, the unresolved and the resolved config)."""
    sets = ["model.shape=[8, 8]", "sampler.steps=40", 'sampler.method="auto"',
            "ensemble.members=4", "ensemble.batch_size=4", "calibrate.members=2",
            f'output.path="{tmp_path / "a.zarr"}"']
    args = ["sample", "jobs/configs/grf.toml", *sum((["--set", x] for x in sets), [])]
    assert main(args) == 0
    group = zarr.open_group(tmp_path / "a.zarr", mode="r+")
    plan = json.loads(group.attrs["plan_settings"])
    unresolved = load_config("jobs/configs/grf.toml", sets)
    resolved = load_config("jobs/configs/grf.toml", sets + [
        f"{k}={json.dumps(v)}" for k, v in plan.items()])
    group.attrs.update(
        piadm_store_digest=resolved.legacy_store_digest(plan["ensemble.batch_size"]),
        plan_config_sha256=unresolved.legacy_store_digest(4))
    for key in ("piadm_member_batch", "plan_batch_size_asked"):
        del group.attrs[key]
    group["done"][0, :] = 0
    return args, unresolved, plan


def test_an_older_auto_store_resumes_at_a_batch_size_asked_since(tmp_path, capsys):
    """An older piadm's "auto" store, its plan keyed by the batch size asked then: a config
    asking another finds the plan (and the size asked then), samples at its own batch size,
    and the upgrade records both."""
    from pipeline.claims import Heartbeat, claims_dir

    args, unresolved, _ = _older_auto_store(tmp_path)
    beat = Heartbeat(claims_dir(tmp_path / "a.zarr"), "older-job").start()  # still filling it
    capsys.readouterr()
    assert main([*args, "--set", "ensemble.batch_size=1", "--dry-run"]) == 2  # as the run would
    assert "being filled by a live job (older-job)" in capsys.readouterr().err
    beat.stop()
    assert main([*args, "--set", "ensemble.batch_size=1", "--dry-run"]) == 0
    assert "an older piadm made it" in capsys.readouterr().err
    assert main([*args, "--set", "ensemble.batch_size=1"]) == 0
    err = capsys.readouterr().err
    assert "plan: the store's own choice" in err and "4 to sample" in err
    attrs = zarr.open_group(tmp_path / "a.zarr", mode="r").attrs
    assert attrs["plan_config_sha256"] == unresolved.store_digest
    assert attrs["plan_batch_size_asked"] == 4


def test_an_older_auto_store_a_plain_config_brought_up_to_date_stays_the_auto_configs(
        tmp_path, capsys):
    """Resumed once with the settings its plan names (a plain config), its plan key stays the
    older one: the "auto" config still finds its plan at any batch size, and resumes the
    store, output.overwrite too, never re-planning and replacing it."""
    args, _, plan = _older_auto_store(tmp_path)
    plain = args + sum((["--set", f"{k}={json.dumps(v)}"] for k, v in plan.items()), [])
    assert main(plain) == 0
    group = zarr.open_group(tmp_path / "a.zarr", mode="r+")
    assert "identity no longer counts" in group.attrs["history"]
    group["done"][0, 2:] = 0
    capsys.readouterr()
    assert main([*args, "--set", "ensemble.batch_size=1", "--set", "output.overwrite=true"]) == 0
    err = capsys.readouterr().err
    assert "plan: the store's own choice" in err and "2 of 4 members done, 2 to sample" in err


def test_an_older_piadms_store_is_resumed_and_brought_up_to_date(tmp_path, input_store, capsys):
    """Stores made before the batch size left the store's identity carry a digest that
    counted it: the same configuration resumes them at any batch size, output.overwrite
    too (it is this configuration's store: never deleted), after a dry run says so."""
    out = tmp_path / "old.zarr"
    cfg = load_config("jobs/configs/grf.toml", _overrides(conditional_sets(input_store, out)))
    assert sample_to_store(cfg, stop=StopAfter(3)).members == 2
    legacy = cfg.legacy_store_digest(2)
    group = zarr.open_group(out, mode="r+")  # as piadm 0.1 left it
    group.attrs.update(piadm_store_digest=legacy, store_sha256=legacy)
    del group.attrs["piadm_member_batch"]
    again = conditional_sets(input_store, out, "ensemble.batch_size=1", "output.overwrite=true")
    assert main(["sample", "jobs/configs/grf.toml", "--dry-run", *again]) == 0
    err = capsys.readouterr().err
    assert "would be resumed: 2 of 36 members done; an older piadm made it" in err
    assert ("in 3 batches of up to 2 (1 member(s) a call: ensemble.batch_size); 17 (item, "
            "batch) pairs to sample") in err
    assert zarr.open_group(out, mode="r").attrs["piadm_store_digest"] == legacy  # untouched
    assert main(["sample", "jobs/configs/grf.toml", *again]) == 0
    assert ("2 of 36 members done, 34 to sample in its batches of 2 (1 member(s) a call"
            in capsys.readouterr().err)
    attrs = zarr.open_group(out, mode="r").attrs
    assert attrs["piadm_store_digest"] == cfg.store_digest == attrs["store_sha256"]
    assert attrs["piadm_member_batch"] == 2
    assert "identity no longer counts ensemble.batch_size" in attrs["history"]
    assert main(["status", str(out)]) == 0


def test_status_of_a_path_that_is_no_store_is_an_error(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "is not a piadm ensemble store" in capsys.readouterr().err
    assert main(["status", "--verify", str(tmp_path)]) == 2  # before the record is read
    assert "is not a piadm ensemble store" in capsys.readouterr().err
    assert main(["status", "--verify", str(tmp_path / "none.zarr")]) == 2
    assert "none.zarr does not exist: pass the output.path of a run" in capsys.readouterr().err


def test_verify_reads_blocks_of_items_and_an_item_past_a_block_chunk_by_chunk(
        tmp_path, input_store, monkeypatch):
    """--verify reads many chunks a call (a call a chunk took three times the whole read), a
    block that fails again chunk by chunk to name the damaged one, and an item larger than a
    block chunk by chunk (a 4 GB item was read whole): the same findings every way."""
    from pipeline import verify

    hurt = tmp_path / "hurt.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, hurt)]) == 0
    chunks = sorted(p for p in (hurt / "vort" / "c").rglob("*") if p.is_file())
    chunks[1].unlink()  # reads back as the fill value: no read fails
    reads = []
    monkeypatch.setattr(verify, "_read_chunk", lambda *a, read=verify._read_chunk: (
        reads.append(a[1:3]) or read(*a)))

    def verified(block: int):
        monkeypatch.setattr(verify, "VERIFY_BLOCK_BYTES", block)
        reads.clear()
        return verify.damaged(str(hurt)), len(reads)

    found, _ = verified(64 * 2**20)
    assert len(found) == 2 and verified(64 * 2**20) == (found, 0)  # one block, no chunk read
    assert verified(1) == (found, 18)  # 6 items of 3 chunks, each larger than a block
    chunks[-1].write_bytes(chunks[-1].read_bytes()[:20])  # cut short: the block read fails
    found, count = verified(64 * 2**20)
    assert len(found) == 4 and count == 18 and verified(1) == (found, 18)


def test_verify_finds_members_damaged_after_writing_and_repair_lets_a_rerun_resample_them(
        tmp_path, input_store, capsys):
    import shutil

    clean, hurt = tmp_path / "clean.zarr", tmp_path / "hurt.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, clean)]) == 0
    shutil.copytree(clean, hurt)
    assert main(["status", "--verify", str(hurt)]) == 0
    assert "every member marked done reads back finite" in capsys.readouterr().out
    chunks = sorted(p for p in (hurt / "vort" / "c").rglob("*") if p.is_file())
    chunks[0].unlink()  # deleted by hand: reads back as the NaN fill value
    chunks[-1].write_bytes(chunks[-1].read_bytes()[:20])  # cut short: does not decode
    assert main(["status", str(hurt)]) == 0  # the done flags alone cannot tell
    capsys.readouterr()
    assert main(["status", "--verify", str(hurt)]) == 1
    out = capsys.readouterr().out
    assert "4 member(s) marked done are damaged" in out  # two chunks of 2 members
    # not "complete" and then a list of damage: one verdict
    assert "\ncomplete\n" not in out and "every member is marked done, but some are damaged\n" in out
    assert "not finite" in out and "unreadable" in out and "--verify --repair" in out
    assert "  time 2020-01-01 (item 0), member 0: " in out  # by label, as plain status names it
    assert main(["status", "--verify", "--json", str(hurt)]) == 1  # for scripts: JSON
    found = json.loads(capsys.readouterr().out)
    assert not found["sound"] and not found["repaired"] and len(found["damaged"]) == 4
    assert found["store"] == found["path"] == str(hurt)
    assert {d["problem"].split()[0] for d in found["damaged"]} == {"not", "unreadable"}
    assert found["damaged"][0]["label"] == "2020-01-01"  # the item as status names it
    assert main(["evaluate", str(hurt), "--truth", str(input_store),
                 "--out", str(tmp_path / "eval")]) == 2
    assert "has 4 damaged member(s)" in capsys.readouterr().err
    from pipeline.claims import Heartbeat, claims_dir

    beat = Heartbeat(claims_dir(hurt), "resuming-job").start()  # a rerun filling the store
    try:
        assert main(["status", "--verify", "--repair", str(hurt)]) == 2
        assert ("is being filled by a live job (resuming-job); piadm marks damaged members not "
                "done only when no job writes to it") in capsys.readouterr().err
    finally:
        beat.stop()
    assert main(["status", "--verify", "--repair", str(hurt)]) == 1
    assert "marked 4 member(s) not done" in capsys.readouterr().out
    history = json.loads(zarr.open_group(hurt, mode="r").attrs["piadm_history"])[-1]
    assert ("status --verify --repair marked 4 damaged member(s) not done: time 2020-01-01 "
            "member 0, time 2020-01-01 member 1, ") in history  # in the store's own record
    assert main(["status", str(hurt)]) == 1
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, hurt)]) == 0
    assert main(["status", "--verify", str(hurt)]) == 0
    assert_same_store(clean, hurt)


def test_a_stop_during_a_repair_lets_it_finish_and_record_itself(tmp_path, input_store, capsys,
                                                                  monkeypatch):
    """A Ctrl-C or SIGTERM part way through --repair left members marked not done with no
    line in the store's history saying so: the repair finishes, is recorded, then stops."""
    import os
    import signal

    import pipeline.verify

    hurt = tmp_path / "hurt.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, hurt)]) == 0
    chunks = sorted(p for p in (hurt / "vort" / "c").rglob("*") if p.is_file())
    chunks[0].unlink()
    real = pipeline.verify.finalize

    def stopped_meanwhile(path, note):  # the signal lands while the repair writes
        os.kill(os.getpid(), signal.SIGTERM)
        real(path, note)

    monkeypatch.setattr(pipeline.verify, "finalize", stopped_meanwhile)
    capsys.readouterr()
    assert main(["status", "--verify", "--repair", str(hurt)]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    history = json.loads(zarr.open_group(hurt, mode="r").attrs["piadm_history"])[-1]
    assert "status --verify --repair marked 2 damaged member(s) not done" in history
    assert done_members(hurt).sum() == done_members(hurt).size - 2


def test_a_damaged_done_record_or_member_counts_are_told_and_repaired(tmp_path, input_store,
                                                                     capsys):
    """A chunk of the done record cut short stops status and sample with one line naming the
    repair, not a traceback; --verify also reads the per-member arrays (a seed chunk deleted
    reads 0, a rounds chunk cut short does not decode); --repair rewrites the record's chunk
    as not done, and a rerun makes the store the clean one again."""
    import shutil

    clean, hurt = tmp_path / "clean.zarr", tmp_path / "hurt.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, clean)]) == 0
    shutil.copytree(clean, hurt)
    first = lambda name: sorted(p for p in (hurt / name / "c").rglob("*") if p.is_file())  # noqa: E731
    record, seeds, rounds = first("done"), first("seed"), first("rounds")
    record[0].write_bytes(record[0].read_bytes()[:3])  # cut short, as by a copy
    seeds[-1].unlink()
    rounds[1].write_bytes(rounds[1].read_bytes()[:3])  # another chunk of members
    capsys.readouterr()
    for command in (["status", str(hurt)],
                    ["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, hurt)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after sample's header
        assert err.startswith("piadm: error: ") and "the done array) is damaged at items 0..0" in err
        assert f"piadm status --verify --repair {hurt}" in err
    assert main(["status", "--verify", str(hurt)]) == 1
    out = capsys.readouterr().out
    assert "members done unknown: the done array cannot be read" in out
    assert "done flag is unreadable" in out and "seed missing" in out
    assert "rounds unreadable" in out
    assert main(["status", "--verify", "--json", str(hurt)]) == 1
    doc = json.loads(capsys.readouterr().out)  # the counts' keys, with nothing to count
    assert doc["done"] is None and doc["members"] is None and not doc["sound"]
    assert main(["status", "--verify", "--repair", str(hurt)]) == 1
    assert "member(s) not done: rerun" in capsys.readouterr().out
    assert main(["status", str(hurt)]) == 1  # incomplete now, no longer damaged
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, hurt)]) == 0
    assert main(["status", "--verify", str(hurt)]) == 0
    assert_same_store(clean, hurt)


def test_verify_of_an_incomplete_store_exits_1_with_its_counts_and_a_live_job_is_named(
        tmp_path, input_store, capsys):
    """``status --verify STORE && next_step`` must not go on with a store half done: --verify
    adds the read-back to the done counts (text and JSON), it does not replace them. A store
    a live job fills says so, rather than asking for a rerun."""
    import zarr

    from pipeline.claims import Heartbeat, claims_dir

    path = tmp_path / "part.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, path)]) == 0
    zarr.open_group(path, mode="r+")["done"][0, 2:] = 0
    capsys.readouterr()
    assert main(["status", "--verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "members done" in out and "incomplete: rerun the same config" in out
    assert "every member marked done reads back finite" in out
    assert main(["status", "--verify", "--json", str(path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["sound"] and not doc["complete"] and doc["done"] < doc["members"]
    beat = Heartbeat(claims_dir(path), "slurm-7.0").start()
    try:
        assert main(["status", str(path)]) == 1
        out = capsys.readouterr().out
        assert "incomplete: being filled by live job(s) slurm-7.0: wait for them" in out
        # a job of parallel.items fills only its own: the items left are named beside it
        assert ("if they fill only some items (parallel.items), the rest need a job of "
                "their own (items not yet complete, those the live jobs fill among them: "
                "[0])") in out
        assert main(["status", "--json", str(path)]) == 1
        assert json.loads(capsys.readouterr().out)["filling"] == ["slurm-7.0"]
    finally:
        beat.stop()
    # a run replacing it (output.overwrite), in its start-up before its first batch: "rerun"
    # was said, and evaluate's "rerun its piadm sample command"
    beat = Heartbeat(claims_dir(path), "replacing-slurm-8.0").start()
    try:
        assert main(["status", str(path)]) == 1
        assert "incomplete: being replaced or grown by live job(s) slurm-8.0: wait" in (
            capsys.readouterr().out)
        assert main(["evaluate", str(path), "--truth", str(input_store)]) == 2
        assert "live job(s) slurm-8.0 are replacing or growing it: wait" in (
            capsys.readouterr().err)
    finally:
        beat.stop()


def test_status_and_verify_agree_on_a_store_whose_growth_was_killed(tmp_path, input_store,
                                                                    capsys):
    """A growth killed after it resized the arrays, before the consolidated metadata said
    so: status read the arrays (2/4 members, incomplete) and --verify the consolidated
    metadata (2/2, complete), so a script polling one got the other's opposite answer."""
    import zarr

    path = tmp_path / "grown.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, path),
                 "--set", "ensemble.members=2", "--set", "ensemble.batch_size=2"]) == 0
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    for name, array in group.arrays():
        names = array.metadata.dimension_names or ()
        if "member" in names:
            at = names.index("member")
            array.resize(tuple(4 if i == at else n for i, n in enumerate(array.shape)))
    capsys.readouterr()
    for args in (["status"], ["status", "--verify"]):
        assert main([*args, str(path)]) == 1
        assert ": 12/24 members done" in capsys.readouterr().out  # 6 items of 2 of 4


def test_verify_counts_the_temp_files_killed_writes_left_and_repair_removes_them(
        tmp_path, input_store, capsys):
    """zarr writes a file through NAME.<hex>.partial and renames it: a kill mid-write left
    them in the store for good, unseen by --verify; the store is sound all the same."""
    path = tmp_path / "s.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, path)]) == 0
    temps = [path / f"zarr.{'a' * 32}.partial", path / "done" / f"zarr.{'b' * 32}.partial"]
    for temp in temps:
        temp.parent.mkdir(parents=True, exist_ok=True)
        temp.write_bytes(b"half")
    (path / "notes.partial").write_text("not zarr's")  # no temp of zarr's: left alone
    capsys.readouterr()
    assert main(["status", "--verify", str(path)]) == 0  # complete and sound
    assert "2 temp file(s) that writes killed part way left" in capsys.readouterr().out
    assert main(["status", "--verify", "--repair", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["leftover_writes_removed"] and len(doc["leftover_writes"]) == 2
    assert not any(t.exists() for t in temps) and (path / "notes.partial").exists()
    assert main(["status", "--verify", str(path)]) == 0
    assert "temp file" not in capsys.readouterr().out
    # a path that is no store is refused, the temp files aside
    assert main(["status", "--verify", str(tmp_path)]) == 2
    assert "is not a piadm ensemble store" in capsys.readouterr().err


def test_jobs_with_distinct_items_fill_one_store(tmp_path, input_store, capsys, monkeypatch):
    import pipeline.ensemble

    clean, shared = tmp_path / "clean.zarr", tmp_path / "shared.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, clean)]) == 0
    reads = []  # the done flags are a file a batch: read at the start, and at the end only
    # where the members done then and those written since may not be all
    import pipeline.run_end

    real = pipeline.ensemble.done_members
    for module in (pipeline.ensemble, pipeline.run_end):  # the start's count, and the end's
        monkeypatch.setattr(module, "done_members", lambda path: reads.append(path) or real(path))
    for part, read in (("[0, 2, 4]", 2), ("[1, 3, 5]", 1)):
        sets = conditional_sets(input_store, shared, f"parallel.items={part}")
        reads.clear()
        assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
        assert len(reads) == read, part
        if part == "[0, 2, 4]":  # half done: status names what is left to whom
            capsys.readouterr()
            assert main(["status", str(shared)]) == 1
            assert "items still to do: [1, 3, 5]" in capsys.readouterr().out
    # the second job's own items had none done: the other job's 18 are not its to skip
    err = capsys.readouterr().err
    assert "18 of 36 members done; this job's items: 0 of 18 done, 18 to sample" in err
    assert "done: 18 members written" in err and "(0 were already done" in err
    assert "the store holds 36 of 36" in err
    assert_same_store(clean, shared)


def test_a_different_config_is_refused_and_the_store_kept(tmp_path, input_store, capsys):
    out = tmp_path / "ens.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]) == 0
    before = _digest_files(out)
    sets = conditional_sets(input_store, out, "sampler.seed=5", "ensemble.members=3")
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err  # and which settings make it so
    # the members alone would grow it (or be refused as a cut): not a difference to match
    assert "it differs in sampler.seed: 0 -> 5)" in err and "ensemble.members" not in err
    assert _digest_files(out) == before


def test_the_same_input_spelled_otherwise_resumes_and_grows_the_store(
        tmp_path, input_store, capsys, monkeypatch):
    """A path is not a setting: x/, ./x, and x made relative or absolute name the same
    store to read, so the store stays this configuration's (its contents are checked by
    their fingerprint)."""
    import os

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ens.zarr"
    config = str(Path(__file__).resolve().parents[1] / "jobs/configs/grf.toml")
    assert main(["sample", config, *conditional_sets(input_store, out, "ensemble.members=4")]) == 0
    relative = os.path.relpath(input_store, tmp_path)
    for spelling, members in ((f"{input_store}/", 4), (f"./{relative}", 6), (relative, 6)):
        capsys.readouterr()
        sets = conditional_sets(spelling, out, f"ensemble.members={members}")
        assert main(["sample", config, *sets]) == 0, \
            capsys.readouterr().err
    from pipeline import api  # and through the API: grown once more

    sets = conditional_sets(f"{input_store}/", out, "ensemble.members=8")[1::2]
    grown = api.sample(load_config(config, sets))
    assert grown.members == 2 * 6 and grown.skipped == 6 * 6  # two new members of 6 items
    attrs = zarr.open_group(out, mode="r").attrs
    assert f'path = "{input_store}"' in attrs["config"]  # the store keeps its spelling
    assert (zarr.open_group(out, mode="r")["done"][:] == 1).all()


def test_a_store_made_with_a_relative_input_says_where_to_resume_it(
        tmp_path, input_store, capsys, monkeypatch):
    """A store made with a relative input.path, met from another folder with that file's
    other spelling: its own config names no file from there, so the refusal says to rerun
    it from the folder it was made in, and names it."""
    import os

    made, other = tmp_path / "made", tmp_path / "other" / "deeper"
    made.mkdir(), other.mkdir(parents=True)
    monkeypatch.chdir(made)
    out = tmp_path / "ens.zarr"
    config = str(Path(__file__).resolve().parents[1] / "jobs/configs/grf.toml")
    relative = os.path.relpath(input_store, made)
    assert main(["sample", config, *conditional_sets(relative, out, "ensemble.members=2")]) == 0
    monkeypatch.chdir(other)
    capsys.readouterr()
    assert main(["sample", config, *conditional_sets(input_store, out,
                                                       "ensemble.members=2")]) == 2
    assert (f"its input.path {relative!r} names no file from this folder: rerun its config "
            f"from the folder it was made in ({made})") in capsys.readouterr().err


def test_a_store_grows_to_more_members_keeping_those_it_holds(tmp_path, input_store, capsys):
    """Asked for more members, a complete store of the same settings is grown, not refused
    nor remade: the members it holds stay as they were written, the rest are sampled (the
    last batch of 2 was half full), and the members are those of a store made at once."""
    clean, grown = tmp_path / "clean.zarr", tmp_path / "grown.zarr"
    more = "ensemble.members=9"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(input_store, clean, WINDOW, more)]) == 0
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(input_store, grown, WINDOW, "ensemble.members=5")]) == 0
    before = xr.open_zarr(grown).load()
    capsys.readouterr()
    args = ["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, grown, WINDOW, more)]
    assert main([*args, "--dry-run"]) == 0
    assert "would be grown from 5 to 9 members: 30 of 54 members done" in (
        capsys.readouterr().err)
    assert main(args) == 0
    assert "grown from 5 to 9 members: 30 of 54 members done, 24 to sample" in (
        capsys.readouterr().err)
    _same_members(clean, grown)
    after = xr.open_zarr(grown)
    assert list(after["member"].values) == list(range(9))
    for name in before.data_vars:  # not one value of the members held changed
        assert np.array_equal(after[name].isel(member=slice(5)).values, before[name].values,
                              equal_nan=True), name
    history = json.loads(zarr.open_group(grown, mode="r").attrs["piadm_history"])
    assert history[-2].endswith("grown from 5 to 9 members (ensemble.members)")
    assert history[-1].endswith("piadm wrote 24 members (30 already written)")
    assert main(["status", "--verify", str(grown)]) == 0
    assert main(args) == 0  # now the 9-member configuration's own store: resumed
    assert "resumed: 54 of 54 members done, 0 to sample" in capsys.readouterr().err


def test_a_store_is_never_cut_to_fewer_members(tmp_path, input_store, capsys):
    out = tmp_path / "ens.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]) == 0
    before = _digest_files(out)
    args = ["sample", "jobs/configs/grf.toml",
            *conditional_sets(input_store, out, "ensemble.members=4")]
    for extra in (["--dry-run"], []):
        capsys.readouterr()
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert "holds 6 members of this configuration and this run asks ensemble.members = 4" in err
        assert "ds.isel(member=slice(4))" in err
        assert "pairs to sample" not in err  # the dry run: nothing would be sampled
    assert _digest_files(out) == before


class Killed(BaseException):
    """A kill -9, as a test raises it where the process would have died."""


def _to_grow(tmp_path, input_store):
    """A store of 6 members to grow, one made with 8 at once, and the larger run's sets."""
    clean, cut_short = tmp_path / "clean.zarr", tmp_path / "cut.zarr"
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(input_store, clean, "ensemble.members=8")]) == 0
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(input_store, cut_short)]) == 0
    return clean, cut_short, conditional_sets(input_store, cut_short, "ensemble.members=8")


@pytest.mark.parametrize("cut", ["before the member labels", "before the sizes are consolidated",
                                 "before the identity"])
def test_a_growth_cut_short_is_finished_by_the_next_run(tmp_path, input_store, capsys,
                                                        monkeypatch, cut):
    """Killed after resizing the arrays, before their new member labels (read as the fill
    value, 0: refused as damaged labels, not grown), the consolidated metadata or the
    identity had the larger configuration's: the store is still the smaller one's, and the
    larger one's next run grows it."""
    from pipeline import store

    clean, cut_short, more = _to_grow(tmp_path, input_store)

    def killed(*args, **kwargs):
        raise Killed

    def resized(path, members):
        for _, array in zarr.open_group(path, mode="r+", use_consolidated=False).arrays():
            dims = array.metadata.dimension_names or ()
            if "member" in dims:
                array.resize(tuple(members if d == "member" else n
                                   for d, n in zip(dims, array.shape)))
        raise Killed

    if cut == "before the member labels":
        monkeypatch.setattr(store, "fit_members", resized)
    else:
        monkeypatch.setattr(store, "consolidate" if cut.startswith("before the sizes")
                            else "finalize", killed)
    with pytest.raises(Killed):
        main(["sample", "jobs/configs/grf.toml", *more])
    monkeypatch.undo()
    assert zarr.open_group(cut_short, mode="r", use_consolidated=False)["done"].shape == (6, 8)
    capsys.readouterr()
    assert main(["sample", "jobs/configs/grf.toml", *more]) == 0
    assert "grown from 6 to 8 members: 36 of 48 members done" in capsys.readouterr().err
    _same_members(clean, cut_short)


@pytest.mark.parametrize("writes", [1, 2, 3])
def test_a_growth_killed_at_any_write_of_the_stores_attributes_is_finished_by_the_next_run(
        tmp_path, input_store, capsys, monkeypatch, writes):
    """Killed at the n-th write of the group's metadata once the identity is being set: the
    config and the identity change together, so the store stays either the smaller
    configuration's or becomes the larger's, and the larger one's next run completes it."""
    from zarr.storage import LocalStore

    clean, cut_short, more = _to_grow(tmp_path, input_store)

    from pipeline import store

    finalize, write, seen = store.finalize, LocalStore.set, []

    async def counted(self, key, value, *args, **kwargs):
        if key == "zarr.json" and seen:
            seen.append(key)
            if len(seen) == writes + 1:
                raise Killed
        return await write(self, key, value, *args, **kwargs)

    def watched(*args, **kwargs):
        seen[:] = seen or ["finalizing"]
        return finalize(*args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", counted)
    monkeypatch.setattr(store, "finalize", watched)
    with pytest.raises(Killed):
        main(["sample", "jobs/configs/grf.toml", *more])
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["sample", "jobs/configs/grf.toml", *more]) == 0
    # killed as it grew, before its sampling, and (3) at the note of the sampling done
    said = {1: "grown from 6 to 8 members: 36 of 48", 2: "resumed: 36 of 48",
            3: "resumed: 48 of 48"}[writes]
    assert f"{cut_short} {said} members done" in capsys.readouterr().err
    _same_members(clean, cut_short)


@pytest.mark.parametrize("next_members, left", [(3, "half resized"), (11, "half resized"),
                                                (3, "fitted back, not consolidated")])
def test_arrays_a_growth_left_half_resized_fit_the_next_runs_count(tmp_path, capsys,
                                                                   next_members, left):
    """Killed while resizing, some arrays hold 400 members and the rest 3 (or killed while
    fitting them back, the consolidated metadata still of 400): the next run, of the store's
    own 3 or of 11, gives every array its count, and xarray opens the store."""
    from pipeline.store import consolidate, fit_members

    out = tmp_path / "half.zarr"
    sets = lambda members: ["sample", "jobs/configs/grf.toml", *sum(  # noqa: E731
        (["--set", s] for s in ["model.shape=[8, 8]", "sampler.steps=20",
                                 f"ensemble.members={members}", f"output.path={out}"]), [])]
    assert main(sets(3)) == 0
    if left == "half resized":
        group = zarr.open_group(out, mode="r+", use_consolidated=False)
        group["done"].resize((1, 400))
        group["field"].resize((1, 400, 8, 8))
    else:
        fit_members(out, 400)
        consolidate(out)
        fit_members(out, 3)
    capsys.readouterr()
    assert main(sets(next_members)) == 0
    assert f"3 of {next_members} members done" in capsys.readouterr().err  # before sampling
    ds = xr.open_zarr(out)
    assert ds.sizes["member"] == next_members and ds["done"].values.all()
    assert list(ds["member"].values) == list(range(next_members))


def test_a_job_that_waited_for_another_growth_grows_from_there_or_is_refused(
        tmp_path, capsys):
    """Two jobs asking 40 and 60 members find a store of 3 together; the first grows it, the
    other, once it holds the lock, finds the store as it is then: from 40 it grows to 60,
    from 60 it refuses 40 as fewer."""
    from pipeline.run_items import load_items, store_spec
    from pipeline.identity import growth
    from pipeline.target import _grow

    def config(out, members):
        return load_config("jobs/configs/grf.toml", [
            "model.shape=[8, 8]", "sampler.steps=20", f"ensemble.members={members}",
            f"output.path={out}"])

    for first, second in [(40, 60), (60, 40)]:
        out = tmp_path / f"race_{first}.zarr"
        assert main(["sample", "jobs/configs/grf.toml", "--set", "model.shape=[8, 8]", "--set",
                     "sampler.steps=20", "--set", "ensemble.members=3", "--set",
                     f"output.path={out}"]) == 0
        late = config(out, second)
        waiting = functools.partial(growth, late)
        assert waiting().made == 3  # what the second job saw before the first grew the store
        assert main(["sample", "jobs/configs/grf.toml", "--set", "model.shape=[8, 8]", "--set",
                     "sampler.steps=20", "--set", f"ensemble.members={first}", "--set",
                     f"output.path={out}"]) == 0
        spec = store_spec(late, load_items(late, check=False), (8, 8))
        if second > first:
            grown = _grow(spec, waiting, overwrite=False)
            assert grown == f"grown from {first} to {second} members"
        else:
            with pytest.raises(StoreExists, match=f"holds {first} members of this configuration"):
                _grow(spec, waiting, overwrite=False)


def test_a_store_a_live_job_fills_is_not_grown(tmp_path, capsys):
    """A job of the smaller configuration still writing would find its store changed: the
    larger one's run, and its dry run, are refused, and the store is kept as it was."""
    from pipeline.claims import Heartbeat, claims_dir

    out = tmp_path / "busy.zarr"
    args = lambda members: ["sample", "jobs/configs/grf.toml", *sum(  # noqa: E731
        (["--set", s] for s in ["model.shape=[8, 8]", "sampler.steps=20",
                                 f"ensemble.members={members}", f"output.path={out}"]), [])]
    assert main(args(3)) == 0
    before = _digest_files(out)
    beat = Heartbeat(claims_dir(out), "smaller-config-job").start()  # it is filling the store
    try:
        for extra in (["--dry-run"], []):
            capsys.readouterr()
            assert main([*args(5), *extra]) == 2
            assert ("is being filled by a live job (smaller-config-job); piadm grows a store "
                    "only when no job writes to it") in capsys.readouterr().err
    finally:
        beat.stop()
    assert _digest_files(out) == before


def test_bringing_an_older_store_up_to_date_waits_for_a_job_finishing(tmp_path, input_store):
    """A job finishing rewrites the attributes: an upgrade meanwhile would be written over.
    The upgrade waits for the finalize lock, then brings the store up to date."""
    import threading
    import time

    from pipeline.claims import Heartbeat, claims_dir, holding
    from pipeline.target import upgrade_identity

    out = tmp_path / "old.zarr"
    cfg = load_config("jobs/configs/grf.toml", _overrides(conditional_sets(input_store, out)))
    assert sample_to_store(cfg, stop=StopAfter(3)).members == 2
    legacy = cfg.legacy_store_digest(2)
    zarr.open_group(out, mode="r+").attrs.update(piadm_store_digest=legacy,
                                                 store_sha256=legacy)
    folder = claims_dir(out)
    beat = Heartbeat(folder, "replacing-finisher").start()  # a live holder, not a filler
    upgrade = threading.Thread(target=upgrade_identity, args=(out, legacy, cfg.store_digest))
    try:
        with holding(folder, "finalize", "replacing-finisher"):
            upgrade.start()
            time.sleep(0.5)
            assert upgrade.is_alive()  # waiting for the lock
            assert zarr.open_group(out, mode="r").attrs["piadm_store_digest"] == legacy
        upgrade.join(timeout=30)
    finally:
        beat.stop()
    assert not upgrade.is_alive()
    assert zarr.open_group(out, mode="r").attrs["piadm_store_digest"] == cfg.store_digest


def test_a_store_whose_chunks_do_not_divide_its_batch_grows_in_batches_of_its_chunks(
        tmp_path, input_store):
    """An older piadm cut the chunks of a store of 3 members made in batches of 4 to 3
    members: grown to 8 in batches of 4, two writers would share the chunk of members
    3 .. 5. The grown store's batches are its chunks."""
    clean, grown = tmp_path / "clean.zarr", tmp_path / "grown.zarr"
    sets = lambda out, members, batch=4: conditional_sets(  # noqa: E731
        input_store, out, WINDOW, f"ensemble.members={members}", f"ensemble.batch_size={batch}")
    assert main(["sample", "jobs/configs/grf.toml", *sets(clean, 8)]) == 0
    assert main(["sample", "jobs/configs/grf.toml", *sets(grown, 3, batch=3)]) == 0
    zarr.open_group(grown, mode="r+").attrs["piadm_member_batch"] = 4  # as that piadm left it
    assert zarr.open_group(grown, mode="r")["done"].chunks == (1, 3)
    assert main(["sample", "jobs/configs/grf.toml", *sets(grown, 8)]) == 0
    assert zarr.open_group(grown, mode="r").attrs["piadm_member_batch"] == 3
    _same_members(clean, grown)


def test_a_new_stores_chunks_hold_its_batch_even_with_fewer_members(tmp_path):
    """Chunks of the whole batch, past the members: the store can grow in its batches."""
    out = tmp_path / "few.zarr"
    assert main(["sample", "jobs/configs/grf.toml", "--set", "model.shape=[8, 8]", "--set",
                 "sampler.steps=20", "--set", "ensemble.members=3", "--set",
                 "ensemble.batch_size=4", "--set", f"output.path={out}"]) == 0
    group = zarr.open_group(out, mode="r")
    assert group["done"].chunks == (1, 4) and group["done"].shape == (1, 3)
    assert group["member"].chunks == (2**20,)  # labels of a store grown far: one file
    assert xr.open_zarr(out)["done"].values.all()


def test_an_older_piadms_store_of_fewer_members_is_brought_up_to_date_before_it_grows(
        tmp_path, input_store, capsys):
    out = tmp_path / "old.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]) == 0
    cfg = load_config("jobs/configs/grf.toml", _overrides(conditional_sets(input_store, out)))
    legacy = cfg.legacy_store_digest(2)
    zarr.open_group(out, mode="r+").attrs.update(piadm_store_digest=legacy,
                                                 store_sha256=legacy)  # as piadm 0.1 left it
    before = _digest_files(out)
    capsys.readouterr()
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(input_store, out, "ensemble.members=8")]) == 2
    assert ("made by an older piadm: run it once with ensemble.members = 6 to bring its "
            "identity up to date, then with 8 to grow it") in capsys.readouterr().err
    assert _digest_files(out) == before


def _sample_members(sets: list[str], members: int) -> int:
    """``piadm sample`` of grf.toml with the ``--set`` items ``sets`` and ``members``."""
    return main(["sample", "jobs/configs/grf.toml", *sum(
        (["--set", s] for s in [*sets, f"ensemble.members={members}"]), [])])


def test_an_auto_store_grows_with_the_plan_it_was_made_with(tmp_path, capsys):
    """An "auto" run's members follow its plan: asked for more, the store is grown with
    that plan (its sampler), not planned again for the larger ensemble."""
    out = tmp_path / "auto.zarr"
    sets = ["model.shape=[16, 16]", "sampler.steps=60", "sampler.method=auto",
            "ensemble.batch_size=2", f"output.path={out}"]
    run = functools.partial(_sample_members, sets)
    assert run(2) == 0
    plan = zarr.open_group(out, mode="r").attrs["plan_settings"]
    capsys.readouterr()
    assert run(5) == 0
    err = capsys.readouterr().err
    assert "plan: the store's own choice" in err and "grown from 2 to 5 members" in err
    assert zarr.open_group(out, mode="r").attrs["plan_settings"] == plan
    assert run(5) == 0  # the grown store is the 5-member configuration's own
    assert "resumed: 5 of 5 members done" in capsys.readouterr().err


def _digest_files(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("extra,needle", [
    (["input.path={missing}"], "does not exist"),
    (["input.variable=temp"], "input.variable 'temp' is not in"),
    (["model.shape=[16, 18]"], "model.shape"),
    (["input.items=['2020-01-02', '2021-05-01']"], "input.items ['2021-05-01'] are not in time"),
    (["input.range=['2019-01-01', '2019-02-01']"], "selects nothing"),
    (["input.range=['2020-01-04', '2020-01-02']"],
     "input.range ['2020-01-04', '2020-01-02'] is reversed: give the earlier label first"),
    (["input.items=['2020-01-02']", "input.range=['2020-01-01', '2020-01-03']"],
     "both choose the items: give one"),
    (["input.path={nan}"], "NaN/Inf at time = 2020-01-03"),
    (["input.item_dim=level"], "input.item_dim = 'level'"),
    (["parallel.items=[9]"], "parallel.items [9] goes past the 6 items"),
    (["parallel.items=[1, 0, 1]"], "parallel.items = [1, 0, 1] names 1 twice"),
    (["input.items=['2020-01-02', '2020-01-02']"],
     "input.items = ['2020-01-02', '2020-01-02'] names '2020-01-02' twice"),
    (["input.items=['2020-01-02', '2020-01-02T00:00']"],
     "name one time twice ('2020-01-02T00:00' is '2020-01-02')"),
])
def test_bad_input_is_one_line_error_and_the_store_is_untouched(tmp_path, input_store, capsys,
                                                                extra, needle):
    out = tmp_path / "ens.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]) == 0
    before = _digest_files(out)
    capsys.readouterr()
    nan = make_input(tmp_path / "nan.zarr", nan_at=2)
    extra = [e.format(missing=tmp_path / "nope.zarr", nan=nan) for e in extra]
    sets = conditional_sets(input_store, out, *extra)
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("piadm: error") and needle in err[-1], err
    assert _digest_files(out) == before


def test_nan_outside_the_selection_is_fine(tmp_path):
    nan = make_input(tmp_path / "nan.zarr", nan_at=2)
    sets = conditional_sets(nan, tmp_path / "ens.zarr", "input.range=['2020-01-04', '2020-01-06']")
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    assert xr.open_zarr(tmp_path / "ens.zarr").sizes["time"] == 3


def test_jobs_of_one_store_calibrate_on_its_first_item_whichever_items_they_fill(
        tmp_path, input_store):
    """Two jobs filling distinct items of one store share a calibration key: both bind the
    model to the store's first item, so that they calibrate alike (one on item 1 chose tol
    0.01 where item 0 gave 0.002)."""
    import torch

    from models import build_model
    from pipeline.run_items import first_item_model

    def bound(items):
        sets = conditional_sets(input_store, tmp_path / "s.zarr", f"parallel.items={items}")
        cfg = load_config("jobs/configs/grf.toml", sets[1::2])
        return first_item_model(cfg, build_model(cfg.model), "cpu")

    x, u = torch.randn(1, 16, 16), torch.tensor([1.0])
    assert torch.equal(bound("[1, 3]")(x, u), bound("[0, 2]")(x, u))
    assert not torch.equal(bound("[1, 3]")(x, u), build_model(load_config(
        "jobs/configs/grf.toml", ["model.shape=[16, 16]"]).model)(x, u))  # it is bound


def test_float_labels_name_the_times_a_sum_of_steps_made():
    """generate-data's times are spinup + interval * k: "1.7" must name 1.7000000000000002,
    by input.items and as input.range's inclusive end, and a time between two stays none."""
    from pipeline.errors import InputError
    from pipeline.inputs import select_items

    times = 0.1 * np.arange(15, 18)
    assert times[2] != 1.7  # what xarray prints as 1.7
    var = xr.DataArray(np.zeros((3, 2)), dims=("time", "x"), coords={"time": times})
    assert select_items(var, "time", ("1.7",), None)["time"].values.tolist() == [times[2]]
    assert select_items(var, "time", (), ("1.5", "1.7")).sizes["time"] == 3
    with pytest.raises(InputError, match=r"input.items \['1.65'\] are not in time"):
        select_items(var, "time", ("1.65",), None)


def test_evaluate_of_a_store_with_a_deleted_chunk_says_only_what_is_damaged(tmp_path,
                                                                              input_store,
                                                                              capsys):
    """A chunk deleted by hand reads back NaN: numpy's warnings of the NaN figures were
    printed before the one line that names the damaged members and their repair."""
    import warnings

    hurt = tmp_path / "hurt.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, hurt)]) == 0
    min(p for p in (hurt / "vort" / "c").rglob("*") if p.is_file()).unlink()
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert main(["evaluate", str(hurt), "--truth", str(input_store),
                     "--out", str(tmp_path / "eval")]) == 2
    assert "has 2 damaged member(s) (e.g. time 2020-01-01 (item 0), member 0:" in \
        capsys.readouterr().err
    assert not [str(w.message) for w in said if issubclass(w.category, RuntimeWarning)]


def test_the_stores_raw_times_are_the_inputs_in_its_units(tmp_path, input_store):
    """The item labels were counted anew from the store's first ("days since 2020-01-03"), so
    the raw numbers of two stores, or of a store and its input, disagreed: a reader with
    decode_times=False combining them by coordinates dropped items."""
    import xarray as xr

    from conftest import conditional_sets

    out = tmp_path / "s.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(
        input_store, out, "input.range=['2020-01-03', '2020-01-04']", "ensemble.members=2")]) == 0
    raw = xr.open_zarr(out, decode_times=False).time
    given = xr.open_zarr(input_store, decode_times=False, consolidated=False).time
    assert raw.attrs["units"].startswith("days since 2020-01-01")  # the input's own
    assert given.attrs["units"].startswith("days since 2020-01-01")
    assert list(raw.values) == list(given.values[2:4]) == [2, 3]
    dates = xr.open_zarr(input_store, consolidated=False).time.values
    assert list(xr.open_zarr(out).time.values) == list(dates[2:4])
    # and the evaluation's metrics.nc counts them as the store does
    assert main(["evaluate", "--no-figures", str(out), "--truth", str(input_store), "--out",
                 str(tmp_path / "e")]) == 0
    scored = xr.open_dataset(tmp_path / "e" / "metrics.nc", engine="scipy", decode_times=False)
    assert list(scored.time.values) == [2, 3]
    assert scored.time.attrs["units"].startswith("days since 2020-01-01")


def test_coordinates_lost_or_damaged_are_told_and_the_store_is_not_resumed(
        tmp_path, input_store, capsys):
    """A coordinate's chunk deleted reads as its fill value: `status --verify` called the
    store sound with every item at one date, members all 0 and y all 0; a garbled one made
    `status` a traceback, exit 1 ("rerun"), and the rerun offered to overwrite the store."""
    import shutil

    from conftest import conditional_sets

    out = tmp_path / "s.zarr"
    sets = conditional_sets(input_store, out, "input.range=['2020-01-01', '2020-01-02']")
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    assert main(["status", "--verify", str(out)]) == 0
    lost = tmp_path / "lost.zarr"
    shutil.copytree(out, lost)
    for name in ("time", "member", "y"):
        (lost / name / "c" / "0").unlink()
    capsys.readouterr()
    assert main(["status", "--verify", str(lost)]) == 1
    assert ("the store's arrays are damaged:\n"
            "  member: its labels are not 0 .. 5 (a chunk deleted reads as the fill value)\n"
            "  time: its labels repeat (a chunk deleted reads as the fill value)\n"
            "  y: its labels repeat (a chunk deleted reads as the fill value)\n") \
        in capsys.readouterr().out
    lost_sets = conditional_sets(input_store, lost, "input.range=['2020-01-01', '2020-01-02']")
    assert main(["sample", "jobs/configs/grf.toml", *lost_sets]) == 2
    assert "the store's arrays are damaged (member: its labels are not" in capsys.readouterr().err
    (out / "time" / "c" / "0").write_bytes(b"garbage")
    assert main(["status", str(out)]) == 2
    assert capsys.readouterr().err.startswith(
        f"piadm: error: store {out}: its time coordinate cannot be read (RuntimeError): the "
        "store is damaged; restore the store from a copy")


def test_an_array_whose_metadata_is_lost_is_told_and_the_store_is_not_resumed(tmp_path, capsys):
    """An array's zarr.json deleted: readers still found it through the consolidated
    metadata, `status --verify` called the store sound, and a rerun consolidated it again
    without that array, hiding the ensemble from xarray while status still said complete."""
    import xarray as xr
    import zarr

    out = tmp_path / "s.zarr"
    sets = ["--set", "model.shape=[8, 8]", "--set", "sampler.steps=10", "--set",
            "ensemble.members=2", "--set", f"output.path={out}"]
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    # what others put beside the arrays is not piadm's to judge: a hidden folder, a group
    (out / ".ipynb_checkpoints").mkdir()
    zarr.open_group(out, mode="r+").create_group("notes")
    assert main(["status", "--verify", str(out)]) == 0
    (out / "field" / "zarr.json").unlink()
    capsys.readouterr()
    assert main(["status", "--verify", str(out)]) == 1
    said = capsys.readouterr().out
    assert "the store's arrays are damaged:\n  field: its metadata (zarr.json) is missing" in said
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 2
    assert ("the store's arrays are damaged (field: its metadata (zarr.json) is missing): "
            "restore the store from a copy") in capsys.readouterr().err
    assert "field" in xr.open_zarr(out).data_vars  # still read as it was
    # a done record whose metadata does not read: one line, not a JSON traceback
    (out / "done" / "zarr.json").write_text("garbage")
    root = json.loads((out / "zarr.json").read_text())
    root.pop("consolidated_metadata")  # as a store still being filled has none
    (out / "zarr.json").write_text(json.dumps(root))
    assert main(["status", str(out)]) == 2
    assert "the done array) cannot be opened (JSONDecodeError)" in capsys.readouterr().err

    # gone, with the consolidated metadata naming it still: it read as all fill value, a
    # store "incomplete: rerun the same config" that the rerun refused
    import shutil

    gone = tmp_path / "gone.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *sets[:-2], "--set",
                 f"output.path={gone}"]) == 0
    shutil.rmtree(gone / "done")
    capsys.readouterr()
    assert main(["status", str(gone)]) == 2
    assert "the done array) cannot be opened (KeyError)" in capsys.readouterr().err


def test_members_that_would_overflow_in_the_datas_units_are_refused_before_the_store(
        tmp_path, capsys):
    """Finite as sampled, a member times an input's std of 3e38 leaves float32: it must not
    be written as Inf and marked done (a sidecar whose std had overflowed did just that), nor
    sampled at all (it was, then refused at its first write): refused before the store."""
    rng = np.random.default_rng(0)
    xr.Dataset({"v": (("time", "y", "x"), rng.standard_normal((1, 8, 8)) * 3e38)},
               coords={"time": [0.0]}).to_zarr(tmp_path / "in.zarr")
    sets = ["model.shape=[8, 8]", "model.condition=mean", f"input.path={tmp_path / 'in.zarr'}",
            "input.variable=v", "sampler.steps=10", "sampler.method=sequential-sde",
            "ensemble.members=2", f"output.path={tmp_path / 'o.zarr'}"]
    assert main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])]) == 2
    err = capsys.readouterr().err
    assert "would pass what float32 (sampler.dtype, the store's) holds" in err.splitlines()[-1]
    assert "RuntimeWarning" not in err and not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("steps, form, warned", [(5, "exponential", True), (8, "exponential", False),
                                                 (5, "eps", False)])
def test_sde_steps_too_long_for_the_exponential_step_are_warned_of(tmp_path, capsys, steps,
                                                                    form, warned):
    """Past h = 2 ln 3 the exponential SDE step grows the noise-dominated directions (grf 8x8
    at 5 steps came out 17.7 times too large) on every sampler of that path."""
    sets = ["model.shape=[8, 8]", f"sampler.steps={steps}", f"sampler.form={form}",
            "sampler.method=pc-window", "sampler.tol=1e-3", f"output.path={tmp_path / 'o.zarr'}"]
    assert main(["sample", "jobs/configs/grf.toml", "--dry-run",
                 *sum((["--set", s] for s in sets), [])]) == 0
    said = "past 2 ln 3 = 2.2, where the exponential step grows" in capsys.readouterr().err
    assert said == warned


def test_a_read_error_of_the_file_system_is_no_damage_and_repair_keeps_the_done_flags(
        tmp_path, input_store, capsys, monkeypatch):
    """An EIO (or an NFS ESTALE) reading a done chunk was taken for damaged bytes: --repair
    marked the finished members not done, to be sampled again. It is an I/O error now, said
    as one, and the record is left as it was."""
    import errno

    from zarr.storage import LocalStore

    out = tmp_path / "s.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]) == 0
    before = zarr.open_group(out, mode="r")["done"][:]
    read = LocalStore.get

    async def failing(self, key, *args, **kwargs):
        if key.startswith(("done/c/", "seed/c/")):
            raise OSError(errno.EIO, "Input/output error", key)
        return await read(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", failing)
    capsys.readouterr()
    assert main(["status", "--verify", "--repair", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Input/output error" in err and "damaged" not in err, err
    monkeypatch.undo()
    assert (zarr.open_group(out, mode="r")["done"][:] == before).all() and before.all()


def test_a_complete_store_on_a_read_only_mount_reruns_as_nothing_to_do(tmp_path, input_store,
                                                                       capsys, monkeypatch):
    """A workflow rerunning its sample step on an archived store (a read-only mount) failed
    making the run's claim there (exit 2), though nothing was left to sample. (The mount is
    stood in for by the writability check: a test cannot remount as an ordinary user.)"""
    from pipeline import ensemble

    out = tmp_path / "s.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]) == 0
    history = zarr.open_group(out, mode="r").attrs["history"]
    monkeypatch.setattr(ensemble, "takes_writes", lambda path: False)
    monkeypatch.setattr(ensemble, "Heartbeat", None)  # no claim is made: it would fail there
    capsys.readouterr()
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]) == 0
    assert "is complete and read-only here: left as it is" in capsys.readouterr().err
    assert zarr.open_group(out, mode="r").attrs["history"] == history


def test_a_store_is_consolidated_from_its_creation(tmp_path, input_store, monkeypatch):
    """Only a run's end consolidated the store: one killed before it ended opened with a
    warning in xarray, and not at all for a reader asking for consolidated metadata."""
    from pipeline import run_end

    out = tmp_path / "s.zarr"
    monkeypatch.setattr(run_end, "_record", lambda *args: None)  # killed before its record
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]) == 0
    assert "piadm wrote" not in zarr.open_group(out, mode="r").attrs["history"]  # no end
    ds = xr.open_zarr(out, consolidated=True)
    assert ds.sizes["member"] == 6 and int(ds["done"].sum()) == ds["done"].size


def _made_before_keys(cfg, out, created, removed):
    """The store at ``out`` as a piadm before the config keys ``removed`` (section, key)
    left it, at ``created``: its config text without them, its digest over the settings it
    had then, no sampler revision recorded."""
    import re

    from pipeline.settings import _settings_digest

    group = zarr.open_group(out, mode="r+")
    text = group.attrs["config"]
    settings = cfg.store_settings()
    for section, key in removed:
        text = re.sub(rf"(?m)^{key} = .*\n", "", text)
        settings[section].pop(key)
    old = _settings_digest(settings)
    group.attrs.update(config=text, piadm_store_digest=old, store_sha256=old, created=created)
    group.attrs.pop("sampler_revision", None)
    return old


def test_a_store_made_before_keys_were_added_is_resumed_as_that_piadm_ran(tmp_path, capsys):
    """Every key added to the settings changed every older store's digest: the same config
    was refused as "a different configuration" naming no difference, and its advice
    (output.overwrite) deleted the finished members. A key it lacks is read as its piadm ran
    without it: model.tf32's default on a CPU; pc-window's theta "one" before its revision 2,
    which a run of another theta does not resume, naming it."""
    out = tmp_path / "old.zarr"
    sets = ["--set", f"output.path={json.dumps(str(out))}", "--set", "model.shape=[8, 8]",
            "--set", "sampler.steps=30", "--set", "ensemble.members=2", "--set",
            "sampler.tol=1e-3"]
    cfg = load_config("jobs/configs/grf.toml", sets[1::2])
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    before = zarr.open_group(out, mode="r")["field"][:]
    _made_before_keys(cfg, out, "2026-12-04T10:00:00Z", [("model", "tf32")])
    capsys.readouterr()
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    attrs = zarr.open_group(out, mode="r").attrs
    assert attrs["piadm_store_digest"] == cfg.store_digest
    assert "its config lacked model.tf32, keys added since" in attrs["history"]
    assert (zarr.open_group(out, mode="r")["field"][:] == before).all()
    # pc-window before its revision 2 (and sampler.theta): the whole step lagged
    _made_before_keys(cfg, out, "2026-12-02T10:00:00Z", [("model", "tf32"), ("sampler", "theta")])
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 2
    err = capsys.readouterr().err
    assert "it differs in sampler.theta: 'one' -> 'secant'" in err
    assert ("it was made by an older piadm, whose config had no model.tf32, sampler.theta "
            "(read as it ran without them): set the settings named to the store's values to "
            "resume it") in err
    # the same settings with more members: brought up to date first, at its own count
    more = [*sets, "--set", "ensemble.members=4", "--set", "sampler.theta=one"]
    assert main(["sample", "jobs/configs/grf.toml", *more]) == 2
    assert ("holds 2 members of this configuration, made by an older piadm: run it once with "
            "ensemble.members = 2") in capsys.readouterr().err
    assert main(["sample", "jobs/configs/grf.toml", *sets, "--set", "sampler.theta=one"]) == 0
    attrs = zarr.open_group(out, mode="r").attrs  # its config now says what made its members
    assert 'theta = "one"' in attrs["config"] and "tf32 = false" in attrs["config"]
    assert main(["sample", "jobs/configs/grf.toml", *more]) == 0
    assert zarr.open_group(out, mode="r")["done"][:].sum() == 4
    assert (zarr.open_group(out, mode="r")["field"][:, :2] == before).all()


def test_an_older_auto_tolerance_store_is_finished_at_its_own_tolerance(tmp_path, capsys,
                                                                         monkeypatch):
    """An older store's own tolerance was looked up under this version's digests only: the
    run that brought it up to date sampled its last members at the cache's tolerance."""
    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "t.zarr"
    sets = ["--set", f"output.path={json.dumps(str(out))}", "--set", "model.shape=[8, 8]",
            "--set", "sampler.steps=20", "--set", "ensemble.members=4", "--set",
            "ensemble.batch_size=2", "--set", 'sampler.tol="auto"']
    cfg = load_config("jobs/configs/grf.toml", sets[1::2])
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    group = zarr.open_group(out, mode="r+")
    group["done"][0, 2:] = 0
    group.attrs["sampler_tol"] = 0.05  # the store's own, which the cache no longer holds
    _made_before_keys(cfg, out, "2026-12-04T10:00:00Z", [("model", "tf32")])
    capsys.readouterr()
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    err = capsys.readouterr().err
    # the store's own tolerance, silently: no calibration (cached or measured) is taken
    assert "sampler.tol = auto" not in err and "2 to sample" in err, err


@pytest.mark.parametrize("edit", ["a list", "lines", "older piadm"])
def test_a_history_edited_by_hand_or_an_older_piadms_is_kept_by_the_next_run(tmp_path, edit):
    """``piadm_history`` set to a real list (docs/store.md calls it a JSON list) or to plain text
    failed every later run in a traceback, the store half grown; a piadm before 2026-11-30
    kept the lines only in ``history``, as JSON text, and the next run dropped them."""
    out = tmp_path / "h.zarr"
    sets = ["model.shape=[8, 8]", "sampler.steps=20", "sampler.method=sequential-sde",
            f"output.path={out}"]
    run = functools.partial(_sample_members, sets)
    assert run(2) == 0
    group = zarr.open_group(out, mode="r+")
    lines = [*json.loads(group.attrs["piadm_history"]), "my note"]
    if edit == "a list":
        group.attrs["piadm_history"] = lines
    elif edit == "lines":
        group.attrs["piadm_history"] = "\n".join(lines)
    else:
        del group.attrs["piadm_history"]
        group.attrs["history"] = json.dumps(lines)
    zarr.consolidate_metadata(str(out))
    assert run(4) == 0
    kept = json.loads(zarr.open_group(out, mode="r").attrs["piadm_history"])
    assert kept[:len(lines)] == lines and kept[-1].endswith("wrote 2 members (2 already written)")
    assert zarr.open_group(out, mode="r").attrs["history"] == "\n".join(kept)


def test_a_store_grown_by_another_revision_of_its_sampler_says_so(tmp_path, capsys):
    """A store an earlier revision of ``pc-window`` filled, grown (or resumed) after an
    upgrade, mixed the two revisions' members with no word: the run says so as it starts,
    and its history line names the revision that wrote its members."""
    from pipeline.samplers import REGISTRY

    out = tmp_path / "r.zarr"
    sets = ["model.shape=[8, 8]", "sampler.steps=20", "sampler.method=pc-window",
            "sampler.tol=1e-2", f"output.path={out}"]
    run = functools.partial(_sample_members, sets)
    assert run(2) == 0
    now = REGISTRY["pc-window"].revision
    group = zarr.open_group(out, mode="r+")
    group.attrs["sampler_revision"] = now - 1  # as an earlier piadm made it
    zarr.consolidate_metadata(str(out))
    capsys.readouterr()
    assert run(4) == 0
    said = f"pc-window revision {now} (the store's first members: revision {now - 1})"
    assert f"note: the members left are sampled by {said}" in capsys.readouterr().err
    history = json.loads(zarr.open_group(out, mode="r").attrs["piadm_history"])
    assert history[-1].endswith(f"piadm wrote 2 members (2 already written), by {said}")
    assert run(4) == 0  # nothing left to write: nothing said
    assert "sampled by" not in capsys.readouterr().err
    assert "revision" not in json.loads(
        zarr.open_group(out, mode="r").attrs["piadm_history"])[-1]


def test_a_job_that_finds_its_store_made_meanwhile_samples_at_the_stores_tolerance(
        tmp_path, capsys, monkeypatch):
    """Two jobs of one "auto" configuration started together each calibrate (neither finds a
    store yet); the one that loses the race to make it resumed it at its own tolerance, and
    the store mixed members of two tolerances under the other's sampler_tol."""
    import pipeline.run_start as run_start

    def run(out, members, ladder):
        return main(["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in [
            "model.shape=[8, 8]", "sampler.steps=40", "sampler.method=pc-window",
            "sampler.tol=\"auto\"", "sampler.distance=0.5", "calibrate.members=2",
            "calibrate.refine=0",
            f"calibrate.ladder={ladder}", f"ensemble.members={members}",
            f"output.path={out}"]), [])])

    first, alone = tmp_path / "t.zarr", tmp_path / "alone.zarr"
    assert run(first, 2, "[0.1]") == 0 and run(alone, 4, "[0.1]") == 0
    monkeypatch.setattr(run_start, "stored_attribute", lambda *a: None)  # no store, it saw
    capsys.readouterr()
    assert run(first, 4, "[0.05]") == 0
    assert "sampler.tol: the store's 0.1, which the job that made it meanwhile calibrated " \
           "(not this run's 0.05)" in capsys.readouterr().err
    _same_members_of(first, alone)


def _same_members_of(a, b):
    x, y = xr.open_zarr(a), xr.open_zarr(b)
    assert np.array_equal(x.field.values, y.field.values) and x.attrs["sampler_tol"] == 0.1


def test_a_store_replaced_while_status_verifies_it_is_one_line(tmp_path, capsys, monkeypatch):
    """A job replacing the store (output.overwrite) moved it aside while ``status --verify``
    read it: a traceback (KeyError: 'done') and exit 1, "incomplete" to a polling script."""
    import shutil

    import pipeline.verify as verify

    out = tmp_path / "v.zarr"
    assert main(["sample", "jobs/configs/grf.toml", "--set", "model.shape=[8, 8]", "--set",
                 "sampler.steps=20", "--set", "sampler.method=sequential-sde", "--set",
                 "ensemble.members=2", "--set", f"output.path={out}"]) == 0
    real = verify.damaged_arrays

    def moved_aside(path):  # as the replacing job's first step, between two reads
        found = real(path)
        shutil.move(out, tmp_path / "aside.zarr")
        return found

    monkeypatch.setattr(verify, "damaged_arrays", moved_aside)
    capsys.readouterr()
    assert main(["status", str(out), "--verify"]) == 2
    assert f"{out} changed while it was read" in capsys.readouterr().err
    # an array missing from a store no job changed is damage: not "run it again" for ever
    shutil.move(tmp_path / "aside.zarr", out)
    shutil.rmtree(out / "item")
    assert main(["status", str(out)]) == 2
    assert "part of the store cannot be found (KeyError" in capsys.readouterr().err


def test_verify_reads_the_items_that_have_members_done_not_whole_blocks(tmp_path, input_store,
                                                                       monkeypatch):
    """A block of items was read whole whatever was done of it: on a store of 100,000 items
    4% done, looking for the other items' missing chunks took 53 s of 56."""
    import zarr

    from pipeline import verify

    out = tmp_path / "part.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *conditional_sets(input_store, out)]) == 0
    done = zarr.open_group(out, mode="r+")["done"]
    flags = np.zeros(done.shape, np.int8)
    flags[2] = flags[3] = 1
    done[:] = flags  # items 2 and 3 of 6 done: the others' chunks as never written
    spans = []
    real = zarr.Array.__getitem__

    def read(array, selection):
        if array.name.strip("/") == "vort":
            spans.append((selection.start, selection.stop))
        return real(array, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", read)
    assert verify.damaged(str(out)) == []
    assert spans == [(2, 4)]
