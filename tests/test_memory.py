import pytest
import torch

from pipeline.comm import SerialComm
from pipeline.memory import peak_since, start_peak
from pipeline.samplers import REGISTRY


def test_peak_counts_a_temporary_allocation_above_the_baseline():
    cpu = torch.device("cpu")
    base = start_peak(cpu)
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del x
    assert peak_since(cpu, base) >= 60 * 2**20
    base = start_peak(cpu)
    assert peak_since(cpu, base) < 60 * 2**20  # the reset forgets the earlier peak


def test_after_keep_freed_memory_a_freed_model_buffer_stays_for_the_next_call():
    from pipeline.host_memory import status_kib
    from pipeline.memory import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc: the allocator is left as it is")
    x = torch.ones(48 * 2**20 // 4)  # 48 MiB touched: above glibc's largest default threshold
    held = status_kib("VmRSS")
    del x
    # kept for reuse, not handed back to the kernel (to be faulted in again by the next call)
    assert status_kib("VmRSS") > held - 8 * 1024


@pytest.mark.parametrize("method", [*REGISTRY, "pc-window+secant"])
def test_each_samplers_registered_state_is_a_floor_of_what_it_holds(method):
    """The refusal of a batch too large (``memory_check.check_memory``) must never refuse one that
    fits: what each sampler registers (its corrector's too) is at most its measured peak,
    model calls included."""
    from models.grf import GaussianRandomField
    from pipeline.grids import make_grid
    from pipeline.memory import sampler_floor
    from pipeline.noise import Noise
    from pipeline.samplers import REGISTRY, SAMPLERS, Options

    method, _, theta = method.partition("+")
    shape, batch, steps = (128, 128), 2, 100
    model = GaussianRandomField(shape)
    grid = make_grid("ou", steps, u_min=1e-3, u_max=10.0, block_size=50)
    noise = Noise(0, tuple((0, m) for m in range(batch)), shape, torch.float32, "cpu", "host")
    tol = 1e-5 if REGISTRY[method].reference == "sequential-ode" else 1e-3
    y0 = noise.prior()
    cpu = torch.device("cpu")
    base = start_peak(cpu)
    SAMPLERS[method](model, y0, grid, noise,
                     comm=SerialComm(), options=Options(tol=tol, data_bound=model.data_bound,
                                                        **({"theta": theta} if theta else {})))
    peak = peak_since(cpu, base)
    s = type("S", (), {"steps": steps, "block_size": 50, "window": 0, "corrector_steps": 0})()
    points = max(REGISTRY[method].points(s).values())
    floor = sampler_floor(method, points, batch, 4 * 128 * 128, theta=theta)
    assert 0 < floor <= peak, (floor / 2**20, peak / 2**20)
    if theta:  # its last evaluations and each point's correction along its last change:
        # three more fields a point than j_max keeps
        assert floor == sampler_floor(method, points, batch, 4 * 128 * 128) * 11 // 8


def _grf_run(tmp_path, *sets):
    sets = ["model.shape=[16, 16]", "sampler.steps=20", "sampler.tol=1e-3",
            "ensemble.members=4", "ensemble.batch_size=2", f'output.path="{tmp_path / "o.zarr"}"',
            *sets]
    return ["sample", "jobs/configs/grf.toml", *sum((["--set", s] for s in sets), [])]


def test_a_batch_whose_sampler_state_cannot_fit_is_refused_before_anything_is_written(
        tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setattr("pipeline.memory_check.available_bytes",
                        lambda device, sharing=1: (10 * 2**20, "available on this node's host"))
    args = _grf_run(tmp_path, "model.shape=[256, 256]", "ensemble.batch_size=4")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # pc-window's window of 20 points (the steps) x 256 KiB x 11 buffers: 55 MiB a member
    assert err.startswith("piadm: error: config: 4 members a batch of pc-window (20 points")
    assert "need at least" in err and "lower sampler.window, add time slices" in err
    assert not (tmp_path / "o.zarr").exists()
    monkeypatch.setattr("pipeline.memory_check.available_bytes",
                        lambda device, sharing=1: (120 * 2**20, "available on this node's host"))
    assert main(args) == 2
    assert ("lower ensemble.batch_size: at most 2 would leave room for the state alone, and "
            "the model's calls need more besides, so try 1") in capsys.readouterr().err


def test_a_sequential_samplers_batch_is_refused_naming_what_lowers_its_state(
        tmp_path, monkeypatch, capsys):
    """sequential-ode registered no state, so a batch of any size passed and the run ran out
    of memory after the store was made; sequential-sde's floor was split over time slices,
    which each hold its whole noise block, and the refusals named time slices and block
    sizes that do not lower a sequential sampler's state."""
    from pipeline.cli import main
    from pipeline.memory import sampler_floor

    monkeypatch.setattr("pipeline.memory_check.available_bytes",
                        lambda device, sharing=1: (10 * 2**20, "available on this node's host"))
    args = _grf_run(tmp_path, "model.shape=[256, 256]", "ensemble.batch_size=32",
                    "ensemble.members=32", "sampler.method=sequential-ode")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "32 members a batch of sequential-ode" in err and "need at least 16.0 MiB" in err
    monkeypatch.setattr("pipeline.memory_check.available_bytes",
                        lambda device, sharing=1: (2**18, "available on this node's host"))
    assert main([*args, "--set", "ensemble.batch_size=1"]) == 2  # 2 fields of 256 KiB a member
    assert "lower the field (model.shape)" in capsys.readouterr().err
    assert main([*args, "--set", "ensemble.batch_size=1", "--set", "sampler.method=sequential-sde",
                 "--set", "parallel.time_slices=1"]) == 2
    err = capsys.readouterr().err
    assert "lower sampler.block_size (the steps whose noise is drawn at once) or the field" in err
    assert "time slices" not in err
    # a block of one step holds less noise than a member's fields: the field is what lowers it
    assert main([*args, "--set", "ensemble.batch_size=1", "--set", "sampler.method=sequential-sde",
                 "--set", "sampler.block_size=1"]) == 2
    assert "lower the field (model.shape)" in capsys.readouterr().err
    one = 4 * 256 * 256
    assert sampler_floor("sequential-sde", 20, 1, one, 2) == sampler_floor("sequential-sde", 20, 1, one)
    assert not (tmp_path / "o.zarr").exists()


def test_a_calibration_whose_sampler_state_cannot_fit_is_refused_before_it_measures(
        tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setattr("pipeline.memory_check.available_bytes",
                        lambda device, sharing=1: (120 * 2**20, "available on this node's host"))
    args = ["calibrate", "jobs/configs/grf.toml", "--force", "--set", "model.shape=[256, 256]",
            "--set", "sampler.steps=20", "--set", "calibrate.members=8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("piadm: error: config: 8 members calibrating pc-window (20 points")
    assert "lower calibrate.members: at most 2 would leave room for the state alone" in last
    assert "calibrating pc-window (window" not in err  # nothing was measured


def test_a_dry_run_foresees_the_calibrations_refusal(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("PIADM_CACHE", str(tmp_path / "cache"))  # nothing calibrated yet
    monkeypatch.setattr("pipeline.memory_check.available_bytes",
                        lambda device, sharing=1: (100 * 2**20, "available on this node's host"))
    args = _grf_run(tmp_path, "model.shape=[256, 256]", 'sampler.tol="auto"',
                    "calibrate.members=8", "ensemble.batch_size=1", "ensemble.members=1")
    assert main([*args[:2], "--dry-run", *args[2:]]) == 2
    err = capsys.readouterr().err
    assert "memory     the run would stop: config: 8 members calibrating pc-window" in err
    assert main(args) == 2 and not (tmp_path / "o.zarr").exists()


def test_a_call_is_checked_at_the_members_it_holds_batch_size_at_most_the_members(
        tmp_path, monkeypatch, capsys):
    """A call holds up to ensemble.batch_size members of one item, however small the batches
    of a store it resumes (``work.cut_calls``): a store of 2 members resumes at a batch size
    of 64 in memory that 16 members a call would not fit."""
    from pipeline.cli import main

    assert main(_grf_run(tmp_path, "model.shape=[256, 256]", "ensemble.members=2",
                         "ensemble.batch_size=1")) == 0
    monkeypatch.setattr("pipeline.memory_check.available_bytes",
                        lambda device, sharing=1: (120 * 2**20, "available on this node's host"))
    larger = _grf_run(tmp_path, "model.shape=[256, 256]", "ensemble.members=2",
                      "ensemble.batch_size=64")
    capsys.readouterr()
    assert main([*larger[:2], "--dry-run", *larger[2:]]) == 0
    assert "the run would stop" not in capsys.readouterr().err
    assert main(larger) == 0
    sixteen = _grf_run(tmp_path, "model.shape=[256, 256]", "ensemble.members=16",
                       "ensemble.batch_size=64", f'output.path="{tmp_path / "new.zarr"}"')
    assert main([*sixteen[:2], "--dry-run", *sixteen[2:]]) == 2  # as the run would
    assert "the run would stop: config: 16 members a batch" in capsys.readouterr().err
    assert main(sixteen) == 2 and not (tmp_path / "new.zarr").exists()


def test_running_out_of_memory_mid_run_is_one_line_and_the_rerun_resumes(
        tmp_path, monkeypatch, capsys):
    """An allocation the floor could not foresee (the model's own) fails on the second batch:
    the first batch's members stay written, and the command with the smaller batch size the
    message asks for finishes the rest in the same store."""
    from pipeline import ensemble
    from pipeline.cli import main

    real, calls = ensemble.sample_batch, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(ensemble, "sample_batch", second_fails)
    assert main(_grf_run(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("piadm: error: sample: rank 0 ran out of memory (cpu) sampling 2 "
                          "members at once with pc-window")
    assert "lower ensemble.batch_size below 2, " in err
    assert main(_grf_run(tmp_path, "ensemble.batch_size=1")) == 0
    again = capsys.readouterr().err
    assert "2 of 4 members done, 2 to sample in its batches of 2 (1 member(s) a call" in again


def test_an_allocation_failure_outside_a_batch_is_one_line_naming_what_to_lower():
    from pipeline.errors import OutOfMemory, as_user_error

    host = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                        "can't allocate memory: you tried to allocate 1090519040 bytes.")
    mended = as_user_error(host, "calibrate")
    assert isinstance(mended, OutOfMemory) and str(mended).startswith("calibrate: out of memory")
    assert "calibrate.members" in str(mended)
    for command, key in (("train", "train.batch_size"), ("generate-data", "data.resolution")):
        told = str(as_user_error(host, command))  # each command names its own settings
        assert key in told and "ensemble.batch_size" not in told, told
    other = RuntimeError("shapes do not match")
    assert as_user_error(other, "calibrate") is other


def test_the_cost_curve_stops_at_the_first_call_that_runs_out_of_memory():
    from pipeline.profiling import cost_curve

    def model(x, u):
        if x.shape[0] > 8:
            raise torch.OutOfMemoryError("out of memory")
        return -x

    curve = cost_curve(model, (4, 4), torch.float32, "cpu", [1, 4, 8, 16, 32], threads=1,
                       repeats=1)
    assert curve.sizes == (1, 4, 8)


def test_an_auto_runs_out_of_memory_line_says_which_batch_sizes_replace_the_plans():
    from pipeline.config import load_config
    from pipeline.ensemble import _out_of_memory

    cfg = load_config("jobs/configs/grf.toml", ["ensemble.batch_size=8"])
    line = _out_of_memory(cfg, 0, "cuda:0", 8, asked=4, plan_batch=8)
    # the config's own size replaced the plan's (it asked 8, not the 4 of then): plain
    assert "(now 8, the plan's" not in _out_of_memory(cfg, 0, "cuda:0", 8, asked=4, plan_batch=16)
    assert "lower ensemble.batch_size below 8 (now 8, the plan's; any size but the 4 the plan " \
           "was made for replaces it), sampler.window" in line
    plain = _out_of_memory(cfg, 0, "cuda:0", 8)  # not planned
    assert "lower ensemble.batch_size below 8, sampler.window" in plain
    # a store resumed in its batches of 2: the call held 2, whatever the setting says
    assert "lower ensemble.batch_size below 2 (now 8), " in _out_of_memory(cfg, 0, "cpu", 2)
    assert ": lower sampler.window, or add" in _out_of_memory(cfg, 0, "cpu", 1)
    # a sequential sampler's state: its fields, which neither the block nor time slices split
    seq = load_config("jobs/configs/grf.toml", ["sampler.method=sequential-ode",
                                                "ensemble.batch_size=8"])
    assert "with sequential-ode: lower ensemble.batch_size below 8, the field (model.shape); " \
        "the members" in _out_of_memory(seq, 0, "cpu", 8)


def test_a_replicated_window_needs_the_whole_window_on_every_time_slice(tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.memory_check import TooLarge, check_memory

    # pc-window's 20 points x 256 KiB x 11 buffers (grf.toml's learned corrector keeps 3 of
    # them): 55 MiB a member, a quarter on 4 slices
    monkeypatch.setattr("pipeline.memory_check.available_bytes",
                        lambda device, sharing=1: (30 * 2**20, "available on this node's host"))
    sets = ["model.shape=[256, 256]", "ensemble.batch_size=1"]
    cfg = load_config("jobs/configs/grf.toml", _grf_run(tmp_path, *sets)[3::2])
    cpu = torch.device("cpu")
    assert "13.8 MiB per rank" in check_memory(cfg, (256, 256), cpu, time_slices=4)
    whole = load_config("jobs/configs/grf.toml", _grf_run(
        tmp_path, *sets, "sampler.window_split=replicated")[3::2])
    with pytest.raises(TooLarge, match="on every time slice .*55.0 MiB .*set "
                                       "sampler.window_split = 'slots'"):
        check_memory(whole, (256, 256), cpu, time_slices=4)


def test_a_replicated_window_means_nothing_to_samplers_that_split_no_window(tmp_path,
                                                                             monkeypatch):
    from pipeline.config import load_config
    from pipeline.memory_check import check_memory

    monkeypatch.setattr("pipeline.memory_check.available_bytes",
                        lambda device, sharing=1: (30 * 2**20, "available on this node's host"))
    cfg = load_config("jobs/configs/grf.toml", _grf_run(
        tmp_path, "model.shape=[256, 256]", "ensemble.batch_size=1", "sampler.method=window",
        "sampler.tol=0.1", "sampler.window=20", "sampler.window_split=replicated")[3::2])
    # window's 12 buffers x 20 points x 256 KiB: 60 MiB, a quarter on each of 4 slices
    assert "15.0 MiB per rank" in check_memory(cfg, (256, 256), torch.device("cpu"),
                                               time_slices=4)


@pytest.mark.parametrize("gpus, sharing", [((0, 1, 2, 3), [1, 1, 1, 1]),
                                           ((0, 0, 1, 1), [2, 2, 2, 2]),
                                           ((0, 0, 0, 1), [3, 3, 3, 1])])
def test_ranks_sharing_a_gpu_are_counted_by_the_gpu_each_holds(monkeypatch, gpus, sharing):
    """With --gpus-per-task=1 every rank sees one device: counting the node's devices took
    four ranks for four sharing one GPU, and the memory check gave each a quarter of its own."""
    from pipeline import memory

    class Rank:  # four ranks of one node, each holding the GPU ``gpus`` names
        def __init__(self, r):
            self.rank = r

        def allgather_object(self, obj):
            return [(obj[0], f"GPU-{g}") for g in gpus]

    for r, want in enumerate(sharing):
        monkeypatch.setattr(memory, "gpu_identity", lambda device, r=r: f"GPU-{gpus[r]}")
        assert memory.memory_sharing(Rank(r), torch.device("cuda", 0)) == want


@pytest.mark.parametrize("text", ["CUDA error: out of memory",
                                  "cuFFT error: CUFFT_ALLOC_FAILED",
                                  "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                  "cublasCreate",
                                  "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"])
def test_a_gpu_librarys_failed_allocation_is_out_of_memory(text):
    # they come as plain RuntimeErrors: a traceback, not the advice on what to lower
    from pipeline.errors import is_out_of_memory

    assert is_out_of_memory(RuntimeError(text))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access"))


def test_cgroup_limits_of_v1_v2_and_hybrid_hosts_are_read(tmp_path):
    """Only a v2 first line was read: on a v1 host (its first line another controller's,
    the memory limit in memory.limit_in_bytes) a 2.5 GiB job limit went unseen, and the
    run the check passed was killed by the kernel without a word."""
    from pipeline.host_memory import NO_CGROUP_LIMIT, cgroup_room

    def host(lines, files):
        proc, root = tmp_path / "proc", tmp_path / "sys"
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        proc.write_text("\n".join(lines) + "\n")
        return cgroup_room(proc, root)

    gib = 2**30
    v1 = ["9:name=systemd:/", "4:memory:/job/step", "0::/"]
    assert host(v1, {"memory/job/step/memory.limit_in_bytes": str(NO_CGROUP_LIMIT * 8),
                     "memory/job/step/memory.usage_in_bytes": str(gib),
                     "memory/job/memory.limit_in_bytes": str(3 * gib),  # the job's, above
                     "memory/job/memory.usage_in_bytes": str(gib // 2)}) == 5 * gib // 2
    v2 = ["0::/job"]
    assert host(v2, {"job/memory.max": str(4 * gib), "job/memory.current": str(gib)}) == 3 * gib
    # the file cache of an input just read counts as used, and is given back on demand
    assert host(v2, {"job/memory.stat": f"anon 1\ninactive_file {gib // 2}\n"}) == 7 * gib // 2
    (tmp_path / "sys" / "job" / "memory.max").write_text("max\n")
    assert host(v2, {}) is None  # no limit
    hybrid = ["1:name=systemd:/", "0::/hj"]
    assert host(hybrid, {"unified/hj/memory.max": str(2 * gib),
                         "unified/hj/memory.current": "0"}) == 2 * gib


def test_an_address_space_limit_is_each_ranks_own_not_shared():
    """``ulimit -v`` limits each process: it was divided among a node's ranks as if they
    shared it, halving what each of 2 ranks was told it had."""
    code = ("import resource, torch\n"
            "from pipeline.host_memory import status_kib\n"
            "from pipeline.memory import available_bytes\n"
            "size = 1024 * status_kib('VmSize')\n"
            "resource.setrlimit(resource.RLIMIT_AS, (size + 2**29, resource.RLIM_INFINITY))\n"
            "one, two = (available_bytes(torch.device('cpu'), n)[0] for n in (1, 2))\n"
            "print(one, two)\n")
    one, two = map(int, _printed_by(code).split())
    assert one <= 2**29 and two > 0.9 * one, (one, two)


def test_keep_freed_memory_works_with_one_file_descriptor_left():
    """Under a low ``ulimit -n`` (an MPI launch holds many files) finding the C library
    started ldconfig and a compiler, failed, and the allocator setting was lost (or, raising,
    stopped the rank's start-up)."""
    code = ("import os, resource\n"
            "from pipeline.memory import keep_freed_memory\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
            "held = []\n"
            "try:\n"
            "    while True:\n"
            "        held.append(os.open(os.devnull, os.O_RDONLY))\n"
            "except OSError:\n"
            "    os.close(held.pop())\n"
            "print(keep_freed_memory())\n")
    assert _printed_by(code).split() == ["True"]


def _printed_by(code: str) -> str:
    """What Python ``code`` prints, run in a process of its own (its limits its own)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr[-1000:]
    return run.stdout
