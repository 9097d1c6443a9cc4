"""Spectral bands (``pipeline.bands``): where the bands fall, that each band's figures are the
ratios they name, and that the bootstrap intervals cover the figures and tell paired units
from unpaired ones."""
import numpy as np

from pipeline.bands import Band, band_figures, correlation_block, spectral_bands


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


def test_one_member_or_one_paired_item_gives_no_interval():
    """A single row of the ensemble is every draw: the interval was the truth's spread alone
    (1-member stores of the exact model: 3 of 4 intervals excluded its ratio 1), and a
    single paired item's a point."""
    rng = np.random.default_rng(5)
    bands = spectral_bands(64, cut=21)
    truth = _spectra(rng, 64)
    for ens, paired, block in ((_spectra(rng, 1), False, 1), (truth[:1], True, 1),
                               (_spectra(rng, 4), False, 4)):  # one item of 4 members
        figs = band_figures(ens, truth[:1] if paired else truth, bands, paired=paired,
                            ens_block=block)
        assert np.isnan(figs.ratio_lo).all() and np.isnan(figs.energy_ratio[:, 1:]).all()
        assert np.isnan(figs.max_deviation[:, 1:]).all()
        assert np.isfinite(figs.energy_ratio[:, 0]).all()  # the figures themselves stay
    two = band_figures(_spectra(rng, 2), truth, bands, paired=False)
    assert np.isfinite(two.energy_ratio).all()


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


def _ar1(rng, m, k, rho):
    """m consecutive rows of k AR(1) columns with lag-one correlation rho, unit variance."""
    x = np.empty((m, k))
    x[0] = rng.standard_normal(k)
    for i in range(1, m):
        x[i] = rho * x[i - 1] + np.sqrt(1 - rho ** 2) * rng.standard_normal(k)
    return x


def test_the_truth_block_follows_the_slowest_columns_correlation():
    rng = np.random.default_rng(0)
    white = rng.standard_normal((2000, 3))
    assert correlation_block(white) == 4  # e-folds within one row
    slow = np.concatenate([white, _ar1(rng, 2000, 1, 0.95)], axis=1)  # e-folds in about 20
    assert 70 <= correlation_block(slow) <= 90
    assert correlation_block(_ar1(rng, 200, 1, 0.999)) == 50  # capped at a quarter of the rows
    assert correlation_block(np.ones((100, 2))) == 1 and correlation_block(white[:5]) == 1


def test_block_intervals_cover_a_correlated_truth_and_row_by_row_ones_do_not():
    rng = np.random.default_rng(1)
    bands = [Band("resolved", 1, 1)]
    ens = 1 + 0.3 * rng.standard_normal((4000, 1))  # independent members, mean 1
    covered = {"rows": 0, "blocks": 0}
    for trial in range(40):
        truth = 1 + 0.3 * _ar1(rng, 1000, 1, 0.95)  # one trajectory of the same climate
        block = correlation_block(truth)
        for name, b in (("rows", 1), ("blocks", block)):
            figs = band_figures(ens, truth, bands, paired=False, draws=400, seed=trial, block=b)
            covered[name] += figs.ratio_lo[0] <= 1 <= figs.ratio_hi[0]
    assert covered["blocks"] >= 0.7 * 40  # a 90% interval, from about 12 blocks a resample
    assert covered["rows"] <= 0.5 * 40  # row by row: about 6 times too narrow


def test_the_largest_deviations_bounds_hold_it_even_for_an_ensemble_against_itself():
    """The bootstrap's own interval of a maximum sits above it (resampled shells scatter from
    1 and their largest deviation grows): an ensemble against itself got 0.00 [0.10, 0.34].
    The bounds come from the shells' intervals instead."""
    rng = np.random.default_rng(5)
    bands = spectral_bands(64, cut=21, input_n=16)
    same = _spectra(rng, 24)
    figs = band_figures(same, same, bands, paired=False)
    assert np.all(figs.max_deviation[:, 0] == 0.0) and np.all(figs.max_deviation[:, 1] == 0.0)
    assert np.all(figs.max_deviation[:, 2] > 0.05)  # the scatter of 24 units allows as much
    # a real deficit: at least what the shell farthest from 1 certainly has, at most its reach
    gain = np.ones(32)
    gain[8:21] = np.linspace(1.0, 0.6, 13)
    figs = band_figures(_spectra(rng, 24) * gain, _spectra(rng, 24), bands, paired=False)
    value, low, high = figs.max_deviation[1]
    assert low <= value <= high and low > 0.1
    shells = slice(8, 21)
    assert np.isclose(high, np.max(np.maximum(np.abs(figs.ratio_lo[shells] - 1),
                                              np.abs(figs.ratio_hi[shells] - 1))))


def test_members_that_share_their_items_input_are_resampled_item_by_item():
    """A conditioned store scored as a climatology: the members of one item share its input,
    and resampled one by one they passed for independent draws (16 items of 4 members sharing
    80% of their variability: the interval held the true ratio, 1, in 62% of 60 tries; by item,
    83%)."""
    bands = [Band("resolved", 1, 8)]
    held = {1: [], 4: []}
    for seed in range(60):
        rng = np.random.default_rng(seed)
        truth = _spectra(rng, 400, k=8)
        shared = rng.lognormal(0, 0.3 * np.sqrt(0.8), (16, 1, 8))  # one item's input
        own = rng.lognormal(0, 0.3 * np.sqrt(0.2), (16, 4, 8))  # mean scatter the truth's
        ens = ((np.arange(1, 9) ** -3.0) * shared * own).reshape(64, 8)
        for block in held:
            lo, hi = band_figures(ens, truth, bands, paired=False, ens_block=block,
                                  seed=seed).energy_ratio[0, 1:]
            held[block].append(lo <= 1 <= hi)
    assert np.mean(held[1]) < 0.72 and np.mean(held[4]) >= 0.75


def test_the_bootstrap_gathers_its_resamples_in_blocks_of_bounded_memory():
    """A store of 16384 members of 16x16 took 1.4 GB to evaluate, for a 17 MB field: every
    resample gathered at once, (draws, members, shells). In blocks the same figures come out
    bit for bit, within a few tens of MB."""
    import tracemalloc

    from pipeline.bands import _resampled_means

    rng = np.random.default_rng(1)
    ens, truth = 1 + rng.random((2048, 16)), 1 + rng.random((64, 16))
    tracemalloc.start()
    band_figures(ens, truth, spectral_bands(32), paired=False, block=4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20, peak / 2**20  # gathered whole: 250 MiB
    picks = rng.integers(0, 2048, (1000, 2048))
    small = picks[:50, :300] % 300
    assert np.array_equal(_resampled_means(ens[:300], small), ens[:300][small].mean(1))
    assert np.array_equal(_resampled_means(ens, picks)[:3], ens[picks[:3]].mean(1))
