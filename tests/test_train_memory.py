"""The training step's memory floor (``pipeline.train_memory``) and the held-out split's noise
drawn a chunk at a time (``pipeline.train.held_out_draws``)."""
from functools import partial

import pytest
import torch

from models.unet import Denoiser, UNetConfig
from pipeline import train_memory
from pipeline.errors import ConfigError
from pipeline.settings import TrainConfig
from pipeline.train import _draws, edm_loss, held_out_draws


def _network(cond_channels=0):
    torch.manual_seed(0)
    return Denoiser(UNetConfig(channels=(8, 16), cond_channels=cond_channels, sigma_data=1.0))


def test_the_activations_a_sample_keeps_are_measured_without_touching_the_network():
    """Per sample, what the forward pass keeps for the backward grows with the field's points
    (four times the points, nearly four times the bytes: a sample's noise-level embedding
    does not grow; the weights drop out); measured with gradients on even where the caller
    has them off, and the network, its mode and the random state are left as they were."""
    den = _network(cond_channels=1)
    state = {k: v.clone() for k, v in den.state_dict().items()}
    rng = torch.get_rng_state()
    loss = partial(edm_loss, den)
    small, large = (train_memory.saved_per_sample(loss, shape, True, "cpu")
                    for shape in ((16, 16), (32, 32)))
    assert small > 8 * 16 * 16 * 4  # at least the first level's activations, in float32
    assert 3.5 * small < large <= 4 * small
    with torch.no_grad():  # a caller's mode: without gradients nothing would be kept
        assert train_memory.saved_per_sample(loss, (16, 16), True, "cpu") == small
    assert den.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in den.state_dict().items())


def _room(device_bytes, host_bytes=None):
    """``available_bytes`` of a machine with ``device_bytes`` on its device (a GPU where
    ``host_bytes`` is given) and ``host_bytes`` on its host."""
    def available(device, sharing=1):
        if torch.device(device).type == "cuda" or host_bytes is None:
            return device_bytes // sharing, f"free on {device}"
        return host_bytes // sharing, "available on this node's host"
    return available


@pytest.mark.parametrize("ranks", [1, 3])
def test_the_batch_a_refusal_names_fits_the_floor_on_the_rank_holding_the_most_rows(
        monkeypatch, ranks):
    """On 3 ranks a rank holds ceil(B / 3) rows: the batch named is the largest whose floor
    fits that rank, one more does not (a count from B / 3 rows named one that did not)."""
    per = 300_000
    monkeypatch.setattr(train_memory, "saved_per_sample", lambda *args: per)
    room = 64 << 20
    monkeypatch.setattr(train_memory, "available_bytes", _room(room))
    with pytest.raises(ConfigError) as err:
        train_memory.check_train_memory(10**6, None, False, (16, 16), "cpu", ranks)
    said = str(err.value)
    fits = int(said.split("at most ")[1].split(" ")[0])

    def floor(batch):
        return train_memory.step_floor(batch, -(-batch // ranks), (16, 16), per, False).device

    assert floor(fits) <= room < floor(fits + 1)
    assert f"so try {fits // 2}" in said
    # a rank's activations are most of it: more nodes would spread them (not more ranks on
    # this node, which shares its memory)
    assert "or spread it over more nodes" in said
    train_memory.check_train_memory(fits, None, False, (16, 16), "cpu", ranks)  # passes


def test_on_a_gpu_the_draws_are_weighed_against_the_host_and_the_rows_against_the_gpu(
        monkeypatch):
    """The batch's noise is drawn on the host of every rank; only a rank's rows go to its
    GPU: a batch whose draws overflow the host is refused naming the host, one whose rows
    overflow the GPU naming the GPU and more GPUs."""
    per, field = 1 << 20, 64 * 64
    monkeypatch.setattr(train_memory, "saved_per_sample", lambda *args: per)
    draws = 10_000 * (train_memory.DRAWN * field + train_memory.PER_SAMPLE)  # 468 MiB
    check = partial(train_memory.check_train_memory, loss=None, conditioned=False,
                    shape=(64, 64), device="cuda", ranks=4, sharing=1, host_sharing=4)
    # the host holds the draws of a batch of 10000 on each of its 4 ranks
    monkeypatch.setattr(train_memory, "available_bytes", _room(8000 * per, 4 * draws))
    check(10_000)  # fits both
    with pytest.raises(ConfigError, match=r"needs at least .* per rank on the host \(the whole "
                                          r"batch's noise, drawn on every rank\) for a step, "
                                          r"and .* for each of 4 ranks: lower train.batch_size"
                                          r": at most 10000 would"):
        check(12_000)  # its rows, 3000 MiB a rank, fit the GPU
    # a GPU that holds the rows of a batch of 4096 on 4 ranks
    monkeypatch.setattr(train_memory, "available_bytes", _room(1100 * per, 4 * draws))
    check(4096)
    with pytest.raises(ConfigError, match=r"per rank on cuda \(1250 samples' activations at "
                                          r"1.0 MiB each\).*or add GPUs"):
        check(5000)


@pytest.mark.parametrize("bounds", [[(0, 10)], [(0, 4), (4, 7), (7, 10)], [(0, 0), (0, 10)]])
def test_the_held_out_noise_drawn_a_chunk_at_a_time_is_the_noise_drawn_at_once(bounds):
    """Each rank's rows, in chunks of 3, are the rows a draw of all 10 held-out times gives:
    the validation loss is the same as before on any number of ranks, its memory a chunk's."""
    t = TrainConfig(seed=4)
    _, sigma, noise = _draws(t.seed + 1, 0, 10, 10, (4, 4), t)
    for lo, hi in bounds:
        got = list(held_out_draws(t, 10, (4, 4), lo, hi, chunk=3))
        assert [a for a, _, _ in got] == list(range(lo, hi, 3))
        if got:
            assert torch.equal(torch.cat([s for _, s, _ in got]), sigma[lo:hi])
            assert torch.equal(torch.cat([n for _, _, n in got]), noise[lo:hi])
