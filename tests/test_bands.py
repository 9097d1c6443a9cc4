"""Spectral bands (``pipeline.bands``): where the bands fall, that each band's figures are the
ratios they name, and that the bootstrap intervals cover the figures and tell paired units
from unpaired ones."""
import numpy as np

from pipeline.bands import band_figures, spectral_bands


def _names(bands):
    return [(b.name, b.kmin, b.kmax) for b in bands]


def test_bands_follow_the_input_nyquist_and_the_truths_cut():
    assert _names(spectral_bands(64, cut=21, input_n=16)) == [
        ("input", 1, 8), ("added", 9, 21), ("beyond", 22, 32)]
    assert _names(spectral_bands(64, cut=21)) == [("resolved", 1, 21), ("beyond", 22, 32)]
    assert _names(spectral_bands(64)) == [("resolved", 1, 32)]
    # an input as fine as the truth's cut leaves nothing to add
    assert _names(spectral_bands(32, cut=8, input_n=16)) == [("input", 1, 8), ("beyond", 9, 16)]


def _spectra(rng, units, k=32):
    """Power-law spectra with independent scatter per unit: (units, k)."""
    return (np.arange(1, k + 1) ** -3.0) * rng.lognormal(0, 0.3, (units, k))


def test_band_figures_are_the_ratios_of_each_band():
    rng = np.random.default_rng(1)
    truth = _spectra(rng, 16)
    gain = np.ones(32)
    gain[8:21] = 0.5  # the model adds half the energy it should at k = 9 .. 21
    gain[21:] = 3.0
    figs = band_figures(truth * gain, truth, spectral_bands(64, cut=21, input_n=16), paired=True)
    assert np.allclose(figs.energy_ratio[:, 0], [1.0, 0.5, 3.0])
    assert np.allclose(figs.max_deviation[:, 0], [0.0, 0.5, 2.0], atol=1e-12)
    assert np.allclose(figs.ratio, gain)
    attrs = figs.attrs()
    assert attrs["bands"] == "input,added,beyond" and attrs["band_added_k"] == "9..21"
    assert attrs["band_added_energy_ratio"] == 0.5


def test_paired_units_cancel_the_truths_scatter_and_unpaired_ones_do_not():
    rng = np.random.default_rng(2)
    truth = _spectra(rng, 32)
    bands = spectral_bands(64, cut=21, input_n=16)
    paired = band_figures(0.8 * truth, truth, bands, paired=True)
    # resampling items together: every draw has the same ratio, the interval is a point
    assert np.allclose(paired.energy_ratio, 0.8)
    unpaired = band_figures(0.8 * truth, truth, bands, paired=False)
    lo, hi = unpaired.energy_ratio[:, 1], unpaired.energy_ratio[:, 2]
    assert np.all(lo < 0.8) and np.all(hi > 0.8) and np.all(hi - lo > 0.05)
    assert np.all(unpaired.ratio_lo <= unpaired.ratio) and np.all(unpaired.ratio <= unpaired.ratio_hi)


def test_intervals_shrink_with_more_units_and_are_reproducible():
    rng = np.random.default_rng(3)
    bands = spectral_bands(64, cut=21)
    widths = []
    for units in (16, 256):
        ens, truth = _spectra(rng, units), _spectra(rng, units)
        figs = band_figures(ens, truth, bands, paired=False)
        widths.append(figs.energy_ratio[0, 2] - figs.energy_ratio[0, 1])
        again = band_figures(ens, truth, bands, paired=False)
        assert np.array_equal(figs.energy_ratio, again.energy_ratio)
    assert widths[1] < widths[0] / 2  # about 1 / sqrt(16)


def test_shells_where_the_truth_has_nothing_are_left_out():
    rng = np.random.default_rng(4)
    truth = _spectra(rng, 8)
    truth[:, 30:] = 0.0  # a dealiased truth: round-off zero past its corner modes
    figs = band_figures(truth * 2, truth, spectral_bands(64, cut=21), paired=True)
    assert np.isnan(figs.ratio[30:]).all()
    assert np.allclose(figs.energy_ratio[1, 0], 2.0) and np.allclose(figs.max_deviation[1, 0], 1.0)
