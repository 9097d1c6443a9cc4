import pytest
import torch

from pipeline.comm import SerialComm
from pipeline.config import ConfigError, load_config
from pipeline.comm import WAIT_POLL_S
from pipeline.layout import choose_device, collective_poll, cpu_threads, place_rank, rank_grid


def test_one_rank_is_one_group_of_one_slice():
    grid = rank_grid(SerialComm(), 1)
    assert (grid.groups, grid.group, grid.slices.size) == (1, 0, 1)


def test_time_slices_must_divide_the_ranks():
    with pytest.raises(ConfigError, match="parallel.time_slices = 2 does not divide the 1 rank: "):
        rank_grid(SerialComm(), 2)


def test_threads_share_the_node_unless_pinned_or_asked(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_threads(4) == 4 and cpu_threads(32) == 1 and cpu_threads(4, requested=3) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # srun --cpus-per-task=2
    assert cpu_threads(4) == 2
    assert cpu_threads(4, requested=16) == 16  # more than its share: asked for
    with pytest.raises(ConfigError, match="parallel.threads = 17 is more than this node's 16 "
                                          "cores: give at most 16"):
        cpu_threads(4, requested=17)  # libgomp could not start them and torch would hang


def test_automatic_threads_stay_at_one_on_small_fields(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_threads(1, field_points=16 * 16) == 1
    assert cpu_threads(1, field_points=64 * 64) == 4  # one per 32x32 points
    assert cpu_threads(1, field_points=512 * 512) == 16  # then the node's share
    assert cpu_threads(1, requested=2, field_points=16 * 16) == 2  # asked: given


def test_ranks_sleep_in_collectives_only_where_they_outnumber_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert collective_poll("auto", 2, 1) is None  # a core each: spin, the lowest latency
    assert collective_poll("auto", 8, 1) == WAIT_POLL_S  # 4 to a core: leave it to others
    assert collective_poll("auto", 1, 4) == WAIT_POLL_S  # more threads than cores
    assert collective_poll("spin", 8, 1) is None and collective_poll("sleep", 1, 1) == WAIT_POLL_S
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # srun --cpus-per-task=2
    assert collective_poll("auto", 16, 2) is None and collective_poll("auto", 16, 3) == WAIT_POLL_S


class _TwoNodes(SerialComm):
    """Rank 0 of two ranks on nodes of their own, the other node's vote on how to wait given."""

    size = 2

    def __init__(self, other_polls: bool):
        self.other_polls = other_polls

    def allgather_object(self, obj) -> list:
        return [obj, self.other_polls]


def test_every_rank_waits_alike_when_nodes_judge_auto_differently(monkeypatch):
    """MPI never matches a blocking collective with a nonblocking one: a rank that would spin
    must poll when another node's ranks poll, or the first collective hangs."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    threads = torch.get_num_threads()
    try:
        for other_polls, expected in ((True, WAIT_POLL_S), (False, None)):
            world = _TwoNodes(other_polls)
            # one thread for one rank on 2 cores: this node alone would spin
            place_rank(world, threads=1, keep_freed=False, wait="auto")
            assert world.poll_s == expected
    finally:
        torch.set_num_threads(threads)


def test_an_unknown_wait_is_refused_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match="parallel.wait = 'busy' must be one of auto, spin, sleep"):
        load_config("jobs/configs/grf.toml", ["parallel.wait=busy"])


def test_cpu_when_there_is_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device(3) == torch.device("cpu")


def test_gpus_are_taken_in_turn_by_node_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert choose_device(5) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # --gpus-per-task=1
    assert choose_device(5) == torch.device("cuda", 0)


@pytest.mark.parametrize("sets,key", [
    (["parallel.time_slices=30", "sampler.block_size=20"], "sampler.block_size"),
    (["parallel.time_slices=12", "sampler.method=window", "sampler.tol=0.1", "sampler.window=10"],
     "sampler.window"),
    (["parallel.time_slices=6", "sampler.method=piadm-ode", "sampler.corrector_steps=4"],
     "sampler.corrector_steps"),
])
def test_more_time_slices_than_points_is_refused_naming_the_key(sets, key):
    with pytest.raises(ConfigError, match=f"parallel.time_slices = .* points of {key}"):
        load_config(None, sets)


@pytest.mark.parametrize("method", ["sequential-sde", "sequential-ode", "dpmpp-2m", "edm-heun"])
def test_a_sequential_sampler_takes_any_time_slices_whatever_its_block(method):
    """It runs whole on every slice: its block_size (the steps whose noise it draws at once)
    gives no slice points to own, so it does not bound the slices."""
    cfg = load_config(None, [f"sampler.method={method}", "sampler.block_size=1",
                             "parallel.time_slices=2"])
    assert cfg.parallel.time_slices == 2
    with pytest.raises(ConfigError, match="more than the 1 point of sampler.block_size: use at "
                                          "most 1 time slice, or"):
        load_config(None, ["sampler.method=piadm-sde", "sampler.block_size=1",
                           "parallel.time_slices=2"])


def _cuda_float32_modes() -> tuple:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):  # torch < 2.9: the older flags
        return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    return conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


def test_cuda_float32_stays_full_precision_unless_tf32_is_asked():
    """torch lets cuDNN convolutions round float32 to TF32 by default, which put a floor of
    about 5e-4 under the parallel samplers' distance on an H200: every command's rank set-up
    turns that off, and model.tf32 = true turns it back on."""
    before = _cuda_float32_modes()
    full = ("ieee", "ieee") if isinstance(before[0], str) else (False, False)
    tf32 = ("tf32", "tf32") if isinstance(before[0], str) else (True, True)
    try:
        place_rank(SerialComm(), threads=torch.get_num_threads(), keep_freed=False)
        assert _cuda_float32_modes() == full
        cfg = load_config("jobs/configs/grf.toml", ["model.tf32=true"])
        place_rank(SerialComm(), threads=torch.get_num_threads(), keep_freed=False,
                   tf32=cfg.model.tf32)
        assert _cuda_float32_modes() == tf32
    finally:
        place_rank(SerialComm(), threads=torch.get_num_threads(), keep_freed=False)


@pytest.mark.parametrize("method", ["auto", "pc-window"])
@pytest.mark.parametrize("value", ['"4"', "four", "0"])
def test_time_slices_that_are_no_count_are_refused_in_one_line(method, value):
    """With an "auto" method too, where the planner would pick the count: a word is an error
    naming the key, not a comparison's traceback."""
    with pytest.raises(ConfigError, match=r"parallel.time_slices = .* must be a number >= 1"):
        load_config("jobs/configs/grf.toml", [f"parallel.time_slices={value}",
                                              f"sampler.method={method}"])


def test_srun_tasks_that_no_mpi_joined_are_told_so_once(monkeypatch, capsys):
    """srun --mpi=none starts each task as a process of its own: they run as separate jobs,
    which the first task says (a batch script's own step, one task, says nothing)."""
    from pipeline import comm

    for name in (*comm.LAUNCHER_VARS, "PIADM_MPI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(comm, "_SAID", [])
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert isinstance(comm.world_comm(), SerialComm) and capsys.readouterr().err == ""
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    comm.world_comm()
    comm.world_comm()
    err = capsys.readouterr().err
    assert err.count("piadm: srun started 2 tasks, but no MPI joined them") == 1
    assert "--mpi=pmi2" in err
