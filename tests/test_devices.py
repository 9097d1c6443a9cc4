"""On a GPU: every sampler, on one rank and on three (split slots, replicated windows), runs
with the model, its states and its noise on the device, as ``tests/fake_cuda.py`` fakes it
on the CPU; and a step by step sampler copies nothing from the host a step (each copy makes
the host wait for the device's queued work)."""
import threading

import numpy as np
import pytest
import torch

from models.grf import GaussianRandomField
from pipeline.comm import SerialComm, _nan_as
from pipeline.grids import make_grid
from pipeline.noise import Noise
from pipeline.samplers import REGISTRY, SAMPLERS, Options
from tests.fake_cuda import CUDA, FakeCuda, on_device

STEPS = 24


class _ThreadRanks:
    """Rank ``rank`` of ranks simulated by threads, its collectives through host numpy as
    ``MPIComm``'s are: a device tensor goes to the host and back."""

    def __init__(self, rank, size, shared):
        self.rank, self.size, self.shared = rank, size, shared
        self.seconds, self.tally, self.poll_s = 0.0, {}, None

    def _all(self, x):
        slots, barrier = self.shared
        slots[self.rank] = np.ascontiguousarray(x.detach().cpu().numpy()).copy()
        barrier.wait()
        got = np.stack(slots)
        barrier.wait()
        return got

    @staticmethod
    def _back(values, like):
        return torch.from_numpy(np.ascontiguousarray(values)).to(like.device)

    def exscan_sum(self, x):
        got = self._all(x)
        return self._back(got[:self.rank].sum(0) if self.rank else np.zeros_like(got[0]), x)

    def allreduce_max(self, x):
        x = _nan_as(x, float("inf"))
        return self._back(self._all(x).max(0), x)

    def allreduce_min(self, x):
        x = _nan_as(x, float("-inf"))
        return self._back(self._all(x).min(0), x)

    def allreduce_sum(self, x):
        return self._back(self._all(x).sum(0), x)

    def bcast(self, x, root):
        return self._back(self._all(x)[root], x)

    def allgather(self, x):
        return self._back(self._all(x), x)

    def alone(self):
        return SerialComm()


def _options(method, **more):
    entry = REGISTRY[method]
    tol = {"tol": 1e-3} if entry.windowed or entry.needs_tol or entry.blocked else {}
    window = {"window": 8} if entry.windowed else {}
    return Options(**{**tol, **window, **more})


def _on_device(method, options: Options, ranks: int = 1):
    """Run ``method`` under the fake device on ``ranks`` thread ranks; (its mode, whether
    each rank's result is on the device)."""
    mode, results, failed = FakeCuda(), [None] * ranks, []

    def rank(comm, r):
        try:
            with mode:
                model = GaussianRandomField((8, 8), device=CUDA)
                grid = make_grid("ou", STEPS, u_min=1e-3, u_max=10.0, block_size=8)
                noise = Noise(3, ((0, 0), (0, 1), (0, 2)), (8, 8), torch.float32, CUDA)
                opts = Options(**{**options.__dict__, "data_bound": model.data_bound})
                y, _ = SAMPLERS[method](model, noise.prior(), grid, noise, comm=comm,
                                        options=opts)
                results[r] = on_device(y)
        except Exception as err:  # said below, with the rank
            failed.append(f"rank {r}: {type(err).__name__}: {err}")

    if ranks == 1:
        rank(SerialComm(), 0)
    else:
        shared = ([None] * ranks, threading.Barrier(ranks, timeout=60))
        threads = [threading.Thread(target=rank, args=(_ThreadRanks(r, ranks, shared), r))
                   for r in range(ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failed, failed
    return mode, results


CASES = ([(name, {}, 1) for name in REGISTRY]
         + [(name, {}, 3) for name, entry in REGISTRY.items() if entry.windowed or entry.blocked]
         + [("pc-window", {"theta": "secant"}, 1), ("pc-window", {"theta": "secant"}, 3),
            ("pc-window", {"window_split": "replicated"}, 3),
            ("pc-window", {"theta": "secant", "window_split": "replicated"}, 2),
            ("sequential-sde", {"denoise_final": True}, 1),
            # every block's sweeps diverge: each member is redone step by step (a host mask
            # of the diverged rows indexed by a device one crashed on a GPU)
            ("piadm-sde", {"divergence_threshold": 1e-30}, 1),
            ("piadm-sde", {"divergence_threshold": 1e-30}, 3)])


@pytest.mark.parametrize("method, more, ranks", CASES,
                         ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}-{r}"
                              for m, o, r in CASES])
def test_every_sampler_runs_on_a_device_without_mixing_host_and_device_tensors(method, more,
                                                                              ranks):
    mode, results = _on_device(method, _options(method, **more), ranks)
    assert dict(mode.problems) == {}
    assert results == [True] * ranks  # the members come back on the device


@pytest.mark.parametrize("method", ["sequential-sde", "sequential-ode", "dpmpp-2m",
                                    "dpmpp-2m-sde", "edm-heun"])
def test_a_step_by_step_sampler_copies_nothing_from_the_host_a_step(method):
    """Each step's clock was copied from the host: the host then waited for the device's
    queued work at every step, and a small network's GPU idled while the next step's
    kernels were launched."""
    mode, _ = _on_device(method, _options(method))
    assert sum(mode.uploads.values()) < STEPS / 4, dict(mode.uploads)


def test_a_ddpm_schedules_table_goes_to_the_device_once():
    """A DDPM schedule's table (a diffusers or plugin network's clock) was built on the host
    and copied to the device at every model call."""
    from pipeline.clock import DiscreteVP

    schedule = DiscreteVP(num_steps=500)
    with FakeCuda() as mode:
        t = torch.linspace(0, 499, 7, device=CUDA)
        for _ in range(5):
            u = schedule.u_of_t(t)
            assert on_device(u) and on_device(schedule.t_of_u(u))
    assert sum(mode.uploads.values()) <= 1 and dict(mode.problems) == {}


def test_the_fake_device_records_what_a_gpu_refuses_and_each_copy_to_it():
    """The mode the tests above rely on: were it blind, they would pass on anything."""
    with FakeCuda() as mode:
        host = torch.zeros(4)
        dev = torch.ones(4, device=CUDA)
        mask = dev > 0
        assert on_device(dev) and on_device(mask) and not on_device(host)
        _ = host + dev  # a GPU refuses each of these
        _ = host[mask]
        host[0:2] = dev[0:2]
        dev.numpy()
        moved = host.to(CUDA)  # and pays for each of these
        dev.copy_(host)
        _ = torch.tensor([1.0, 2.0], device=CUDA)
        assert on_device(moved) and not on_device(moved.cpu())
    said = {what for what, _ in mode.problems}
    assert said == {"host and device tensors in add", "a host tensor indexed by a device index",
                    "device values stored into a host tensor", "numpy() of a device tensor"}
    assert sum(mode.uploads.values()) == 3


def _learned(tmp_path, name, seed, channels=(4, 8), cond=0, **meta):
    """A tiny U-Net checkpoint of 8x8 fields (``cond`` channels of 4x4 coarse fields)."""
    from models.checkpoint import save_checkpoint
    from models.unet import Denoiser, UNetConfig

    torch.manual_seed(seed)
    den = Denoiser(UNetConfig(channels=channels, embed=8, cond_channels=cond))
    info = {"unet": den.cfg.to_dict(), "mean": 0.5, "std": 2.0, "variable": "vorticity",
            "condition": "coarse_v" if cond else "", "residual": False, "shape": [8, 8],
            "data_bound": 10.0, **({"cond_shape": [4, 4]} if cond else {}), **meta}
    save_checkpoint(tmp_path / f"{name}.pt", {"ema": den.state_dict()}, info)
    return str(tmp_path / f"{name}.pt")


def _networks(model) -> list:
    """The torch modules a built model holds (a guided pair's two, a plugin's one)."""
    found = []
    for obj in (model, getattr(model, "den", None), getattr(model, "net", None)):
        found += [x for x in (obj, *(getattr(obj, a, None) for a in ("strong", "weak", "net")))
                  if isinstance(x, torch.nn.Module)]
    return found


@pytest.mark.parametrize("kind", ["guided", "downscaler", "residual", "module"])
def test_a_learned_or_brought_network_samples_on_a_device(tmp_path, kind):
    """Built on the device, its weights there, bound to a coarse field there, sampled by
    the sequential sampler and the window without a host tensor meeting a device one."""
    from models import build_model
    from pipeline.run_items import bind_field
    from pipeline.settings import ModelConfig

    coarse = np.arange(16, dtype=np.float64).reshape(4, 4) / 16
    section = {
        "guided": lambda: ModelConfig(kind="unet", shape=(8, 8),
                                      checkpoint=_learned(tmp_path, "strong", 0, (8, 16)),
                                      guide=_learned(tmp_path, "weak", 1), guidance=2.0),
        "downscaler": lambda: ModelConfig(kind="unet", shape=(8, 8), condition="coarse",
                                          checkpoint=_learned(tmp_path, "down", 0, cond=1)),
        "residual": lambda: ModelConfig(kind="unet", shape=(8, 8), condition="coarse",
                                        checkpoint=_learned(tmp_path, "res", 0, cond=1,
                                                            residual=True)),
        "module": lambda: ModelConfig(kind="module", target="tests.byo_nets:ConditionPlusOne",
                                      prediction="x0", process="edm", shape=(8, 8),
                                      condition="coarse"),
    }[kind]()
    with FakeCuda() as mode:
        model = build_model(section, "cuda")
        if section.condition == "coarse":
            model = bind_field(model, "coarse", coarse, "cuda")
        weights = [t for net in _networks(model) for t in (*net.parameters(), *net.buffers())]
        assert weights and all(on_device(t) for t in weights)
        grid = make_grid("ou", STEPS, u_min=1e-3, u_max=10.0, block_size=8)
        noise = Noise(3, ((0, 0), (0, 1)), (8, 8), torch.float32, CUDA)
        for method, options in (("sequential-sde", Options()),
                                ("pc-window", Options(tol=1e-3, window=8, theta="secant",
                                                      data_bound=model.data_bound))):
            y, _ = SAMPLERS[method](model, noise.prior(), grid, noise, comm=SerialComm(),
                                    options=options)
            assert on_device(y)
    assert dict(mode.problems) == {}


def test_training_runs_on_a_device(tmp_path):
    """Two steps of a conditioned network's training, its validation and its checkpoint."""
    from pipeline import api
    from pipeline.cli import main
    from pipeline.train import train

    data = tmp_path / "k.zarr"
    sets = ["data.resolution=16", "data.spinup=0.5", "data.interval=0.25", "data.snapshots=12",
            "data.chunk=4", f"data.path={data}"]
    assert main(["generate-data", "jobs/configs/kolmogorov.toml",
                 *sum((["--set", s] for s in sets), [])]) == 0
    cfg = api.load_config("jobs/configs/kolmogorov.toml", {
        "train.steps": 2, "train.batch_size": 4, "train.channels": [8, 16],
        "train.val_every": 2, "train.log_every": 1, "train.validation": 0.25,
        "train.data": str(data), "train.checkpoint": str(tmp_path / "t.pt"),
        "train.condition": "vorticity_coarse"})
    with FakeCuda() as mode:
        result = train(cfg.train, comm=SerialComm(), device=torch.device("cuda"))
    assert result.step == 2 and dict(mode.problems) == {}
