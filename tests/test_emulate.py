"""The emulated accelerator: the base model's answers, at least the emulated wall time."""
import time

import torch

from models import build_model
from models.emulate import Emulated
from models.grf import GaussianRandomField
from pipeline.config import load_config


def test_a_call_of_n_items_lasts_latency_plus_n_per_item_and_answers_as_the_base():
    base = GaussianRandomField((8, 8))
    model = Emulated(base, 20.0, 5.0)
    x, u = torch.randn(6, 8, 8), torch.full((6,), 0.5)
    start = time.perf_counter()
    out = model(x, u)
    elapsed = time.perf_counter() - start
    assert torch.equal(out, base(x, u))
    assert 0.050 <= elapsed < 0.050 + 0.5  # 20 + 6 x 5 ms, then no more than scheduling noise
    assert model.shape == base.shape and model.data_bound == base.data_bound


def test_the_config_key_wraps_any_model_and_is_off_by_default():
    assert not isinstance(build_model(load_config(None, []).model), Emulated)
    model = build_model(load_config(None, ["model.emulate_ms=[5, 1]", "model.shape=[8, 8]"]).model)
    assert isinstance(model, Emulated) and model.seconds(65) == (5 + 65) / 1000
