"""bench --renoise: held-out fields noised to a level and sampled back keep their energy
under an exact model, and show the levels where a wrong model loses it."""
import numpy as np
import torch

from models.grf import GaussianRandomField
from pipeline.cli import main
from pipeline.grids import make_grid
from pipeline.noise import Noise
from pipeline.renoise import band_ratios, from_level, octave_bands, renoised
from pipeline.evaluation import power_spectra

SHAPE, MEMBERS = (16, 16), 256


def _band_ratios(model, x0, u):
    grid = make_grid("ou", 120, u_min=1e-3, u_max=10.0, block_size=120)
    noise = Noise.members(3, 0, range(MEMBERS), SHAPE, torch.float64)
    y = renoised(model, x0, grid, u, noise, "sequential-sde")
    spectra = lambda x: power_spectra(x.numpy())[1][:, :8]  # noqa: E731
    return band_ratios(spectra(y), spectra(x0), octave_bands(8))


def test_octave_bands_cover_every_shell_once():
    assert octave_bands(21) == [(1, 2), (3, 4), (5, 8), (9, 16), (17, 21)]
    assert octave_bands(2) == [(1, 2)]


def test_the_grid_from_a_level_keeps_the_samplers_steps_below_it():
    grid = make_grid("ou", 200, u_min=1e-3, u_max=10.0, block_size=50)
    part = from_level(grid, 0.3)
    assert float(part.u[0]) == 0.3 and torch.equal(part.u[1:], grid.u[grid.u < 0.3])
    assert part.blocks == [(0, part.steps)]


def test_an_exact_model_keeps_every_bands_energy_from_every_level():
    model = GaussianRandomField(SHAPE)
    x0 = model.sample(MEMBERS, seed=1)
    for u in (0.03, 1.0, 10.0):
        ratios = _band_ratios(model, x0, u)
        assert np.all(np.abs(ratios - 1) < 0.1), (u, ratios)


def test_a_wrong_model_loses_energy_only_from_the_levels_above_the_loss():
    # the model's law is steeper than the data's: at k = 3..4 it holds under a third of the
    # data's energy; fields renoised just above u_min keep theirs, the more noise the less
    data, model = GaussianRandomField(SHAPE, slope=3.0), GaussianRandomField(SHAPE, slope=5.0)
    x0 = data.sample(MEMBERS, seed=1)
    mid = [_band_ratios(model, x0, u)[1] for u in (0.002, 0.1, 10.0)]  # band k = 3..4
    law = power_spectra(model.sample(MEMBERS, seed=2).numpy())[1][:, 2:4].sum(1).mean() / \
        power_spectra(x0.numpy())[1][:, 2:4].sum(1).mean()
    assert mid[0] > 0.95 and mid[0] > mid[1] > mid[2]
    assert law < 0.3 and abs(mid[2] / law - 1) < 0.15  # from u_max: the model's own law


def test_renoise_refuses_a_model_without_held_out_data(capsys):
    assert main(["bench", "jobs/configs/grf.toml", "--renoise"]) == 2
    err = capsys.readouterr().err.strip()
    assert "renoises the held-out data of a trained U-Net" in err and len(err.splitlines()) == 1
