"""The bench's bookkeeping: a row's shares of time are of one repeat."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bench import _row
from pipeline.bench_timing import model_waits, split_calls, timed_run
from pipeline.cli import main
from pipeline.comm import SerialComm
from pipeline.samplers import Stats


def test_the_time_in_collectives_is_the_fastest_repeats_over_its_own_wall():
    comm = SerialComm()
    repeats = iter([(0.02, 0.01), (0.2, 0.15)])  # (wall, of which in collectives): fast first

    def sampler(model, y0, grid, noise, *, comm, options):
        wall, in_collectives = next(repeats)
        time.sleep(wall)
        comm.seconds += in_collectives
        return y0, Stats(rounds=1, model_calls=1.0)

    _, stats, timing, _ = timed_run(sampler, None, torch.zeros(1), None, None, comm=comm,
                                     options=None, device=torch.device("cpu"), repeats=2)
    row = _row("m", 0, None, 1, 1, 1, stats, 1.0, None, None, timing)
    assert 0.02 <= row["wall_s"] < 0.1 and row["wall_med_s"] >= 0.1
    assert 0.1 < row["comm_share"] <= 0.5  # the first repeat's 0.01 s of its ~0.02 s


def test_waiting_is_split_into_the_last_ranks_extra_model_time_and_the_rest():
    # (ranks 3, calls 2, [seconds in the call, model seconds since the previous collective])
    table = np.array([[[0.010, 0.005], [0.001, 0.0]],
                      [[0.002, 0.012], [0.004, 0.0]],
                      [[0.007, 0.004], [0.004, 0.0]]])
    own, waits = model_waits(table)
    # the last to arrive spends least: rank 1 in the first call, rank 0 in the second
    assert np.allclose(own, [0.002, 0.001])
    # rank 0 waited 8 ms, 7 of them while rank 1 was in its 7 ms more of model calls; rank 2
    # waited 5 ms for 8 ms more (at most its wait); equal model time explains no waiting
    assert np.allclose(waits, [0.007, 0.0, 0.005])


class TwoRanks:
    """Rank 0 of two, the other rank's records of the same collectives given: the gathers
    ``split_calls`` makes, without MPI."""

    size, rank = 2, 0

    def __init__(self, other):
        self.other = torch.tensor(other, dtype=torch.float64)

    def allreduce_max(self, x):
        return x  # both ranks recorded as many calls

    def allgather(self, x):
        return torch.stack([x, self.other])


def test_the_split_takes_model_time_between_collectives_on_the_rank_that_waited_most():
    # rank 0's calls: (kind, seconds in it, model seconds since the run began: 4 ms before the
    # first, 2 more before the second); rank 1 spent 1 ms in each, after 9 and 4 ms of model
    calls = [("Allgather", 0.006, 0.004), ("Allreduce", 0.003, 0.006)]
    own, wait = split_calls(TwoRanks([[0.001, 0.009], [0.001, 0.004]]), calls)
    # rank 1 arrived last at both: their own time is its 1 ms. Rank 0, which spent most,
    # waited 5 ms for rank 1's 5 more of model time, then 2 ms for its 2 more (4 less 2)
    assert own == pytest.approx({"Allgather": 0.001, "Allreduce": 0.001})
    assert wait == pytest.approx(0.007)


def test_a_method_whose_members_cannot_fit_in_memory_is_left_out_of_the_bench(capsys):
    # 10^9 members of 64x64 float32: terabytes for pc-window's window, refused before the
    # bench draws any noise (it hung building 10^9 noise keys)
    sets = ["model.shape=[64, 64]", "sampler.steps=20", "sampler.tol=1e-3",
            "bench.members=1000000000", 'bench.methods=["pc-window"]', "bench.sizes=[[64, 64]]"]
    assert main(["bench", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])]) == 2
    err = capsys.readouterr().err
    assert "left out pc-window: config: 1000000000 members a batch of pc-window" in err
    assert "lower bench.members: at most " in err
    assert "error: bench: every method of bench.methods was left out" in err


def test_a_method_whose_calibration_falls_short_is_left_out_of_the_bench(capsys):
    """One method that cannot reach sampler.distance costs its own rows, not the bench's."""
    sets = ["model.shape=[8, 8]", "sampler.steps=40", 'sampler.tol="auto"',
            "sampler.distance=1e-12", "calibrate.ladder=[0.1]", "calibrate.members=1",
            'bench.methods=["sequential-sde", "window"]', "bench.sizes=[[8, 8]]"]
    assert main(["bench", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "left out window: calibrate: no tolerance in calibrate.ladder keeps window" in text
    rows = [line.split()[0] for line in text.splitlines() if line.split()[:1] in
            (["sequential-sde"], ["window"])]
    assert rows == ["sequential-sde"]


def test_a_size_the_network_does_not_take_names_bench_sizes_before_any_output(capsys):
    rc = main(["bench", "jobs/configs/kolmogorov_uncond.toml", "--set", "bench.sizes=[[32, 32]]",
               "--set", "sampler.steps=10", "--set", "bench.repeats=1",
               "--set", 'bench.methods=["sequential-sde"]'])
    out, err = capsys.readouterr()
    assert rc == 2 and "piadm bench:" not in out + err
    assert "bench.sizes = [[32, 32]] asks for a 32x32 field, which the model does not take" in err


def test_a_seed_sweep_is_one_point_per_method_and_size_in_the_graph():
    """Its worst row: a line through every seed's row (and the worst) zig-zagged."""
    from pipeline.bench_figures import one_per_point

    row = lambda seed, d, ranks=1, wall=1.0: {"method": "pc-window", "seed": seed,  # noqa: E731
                                              "d": d, "ranks": ranks, "rounds": 30,
                                              "wall_s": wall}
    rows = [row(0, 64), row(1, 64), row("worst", 64, wall=2.0), row(0, 256), row(1, 256),
            row("worst", 256, wall=3.0), row(0, 64, ranks=2)]
    kept = one_per_point(rows)
    assert [(r["d"], r["ranks"], r["seed"]) for r in kept] == [(64, 1, "worst"),
                                                                  (256, 1, "worst"), (64, 2, 0)]


def test_a_jobs_time_slices_do_not_stop_its_config_being_benched_on_one_rank(capsys):
    """Every rank is a time slice of the bench: a job config's parallel.time_slices = 2 was
    refused on 1 rank, then ignored on 4."""
    sets = ["parallel.time_slices=2", "bench.sizes=[[8, 8]]", "sampler.steps=20",
            'bench.methods=["sequential-sde"]']
    assert main(["bench", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])]) == 0
    assert "sequential-sde" in capsys.readouterr().out


def test_bench_rows_name_their_shape_and_a_size_or_method_named_twice_is_refused(tmp_path,
                                                                                 capsys):
    """16x32 and 32x16 share d = 512: the JSON rows told them apart by nothing; a size named
    twice was benched twice and a method named twice dropped from the rows unsaid."""
    import json

    sets = ["bench.sizes=[[8, 16], [16, 8]]", "sampler.steps=10",
            'bench.methods=["sequential-sde"]']
    args = ["bench", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])]
    assert main([*args, "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert sorted(r["shape"] for r in rows) == [[8, 16], [16, 8]]
    for twice in ("bench.sizes=[[8, 8], [8, 8]]", 'bench.methods=["window", "window"]'):
        assert main([*args, "--set", twice]) == 2
        assert "twice (it would be benched twice): list each once" in capsys.readouterr().err


def test_bench_at_equal_quality_goes_on_past_a_method_left_out(tmp_path, capsys):
    """bench --quality benches one method at a time: a method left out (piadm-sde's blocks
    wider than the steps found, so they diverged) stopped the whole run with "every method of
    bench.methods was left out", before the next method and with no JSON written."""
    out = tmp_path / "q.json"
    assert main(["bench", "jobs/configs/grf.toml", "--quality", "sequential-ode@40",
                 "--set", "bench.sizes=[[8, 8]]", "--set", "bench.repeats=1",
                 "--set", "bench.quality_members=16", "--set", "sampler.block_size=100",
                 "--set", 'bench.methods=["sequential-sde", "piadm-sde", "window"]',
                 "--json", str(out)]) == 0
    assert "left out piadm-sde" in capsys.readouterr().err
    methods = {row["method"] for row in json.loads(out.read_text())["rows"]}
    assert methods == {"sequential-sde", "window"}


def test_bench_at_equal_quality_with_every_method_left_out_is_an_error(capsys):
    """Going on past a method left out must not make a run of no rows a success (exit 0 with
    an empty table and JSON), where plain bench exits 2."""
    assert main(["bench", "jobs/configs/grf.toml", "--quality", "sequential-ode@40",
                 "--set", "bench.sizes=[[8, 8]]", "--set", "bench.repeats=1",
                 "--set", "bench.quality_members=16", "--set", "sampler.block_size=100",
                 "--set", 'bench.methods=["piadm-sde"]']) == 2
    assert "every method of bench.methods was left out at the steps found" in \
        capsys.readouterr().err


def test_a_json_written_on_a_full_disk_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """bench's, plan's, renoise's and equal quality's --json were written in place: a full
    disk cut the earlier file to its first 4096 bytes, and the error named no file."""
    import errno
    from pathlib import Path

    from pipeline.processes import replace_text

    out = tmp_path / "runs" / "b.json"
    replace_text(out, '{"earlier": "run"}')
    real = Path.write_text

    def full(self, text, *args, **kwargs):
        real(self, text[:4], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left") as raised:
        replace_text(out, '{"new": "rows"}')
    assert raised.value.filename == str(out)
    monkeypatch.undo()
    assert out.read_text() == '{"earlier": "run"}'
    assert [p.name for p in out.parent.iterdir()] == ["b.json"]


def test_the_json_writers_text_has_null_for_nan_and_infinities():
    """bench, plan, --quality and --renoise wrote plain json.dumps: a NaN distance or error
    became a NaN token, which standard JSON readers refuse; metrics.json wrote null."""
    import json

    from pipeline.jsontext import json_text

    text = json_text({"rows": [{"rel_dist": float("nan"), "w2": float("inf"), "n": 3}],
                      "curves": [(1, float("-inf"))]})
    assert json.loads(text) == {"rows": [{"rel_dist": None, "w2": None, "n": 3}],
                                "curves": [[1, None]]}
    assert "NaN" not in text and "Infinity" not in text


def test_a_figure_stopped_mid_write_leaves_the_earlier_one(tmp_path):
    """bench --png (and --quality) saved onto the file itself: a Ctrl-C while it was written
    left 0 bytes where the earlier plot was."""
    from pipeline.figures import save as _save

    path = tmp_path / "bench.png"
    path.write_bytes(b"the earlier plot")

    class Stopped:
        def savefig(self, target, **options):
            Path(target).write_bytes(b"half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _save(Stopped(), path)
    assert path.read_bytes() == b"the earlier plot" and [p.name for p in tmp_path.iterdir()] \
        == ["bench.png"]


def test_a_compare_table_without_a_config_is_not_checked_against_the_defaults():
    """A table with no ``config`` (an older one, or one cut down by hand) was refused as
    "benched with other settings", naming piadm's defaults as its settings."""
    from pipeline.bench_tables import _differences
    from pipeline.config import load_config

    cfg = load_config("jobs/configs/grf.toml", ["sampler.steps=50"])
    assert _differences(cfg, "") == []
    said = _differences(cfg, "[sampler]\nsteps = 60\n")
    assert "sampler.steps: 60 -> 50" in said
