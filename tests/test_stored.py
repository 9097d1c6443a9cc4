"""A store's recorded config read by this piadm (``pipeline.stored``)."""
import re

import pytest

from pipeline.config import load_config
from pipeline.stored import stored_settings


def _without(text: str, *keys: str) -> str:
    for key in keys:
        text = re.sub(rf"(?m)^{key} = .*\n", "", text)
    return text


@pytest.mark.parametrize("attrs, theta, tf32, untold", [
    ({"sampler_method": "pc-window", "created": "2026-12-02T00:00:00Z", "model_kind": "grf"},
     "one", False, []),  # before pc-window's revision 2: the whole step lagged
    ({"sampler_method": "pc-window", "created": "2026-12-03T05:00:00Z", "model_kind": "grf"},
     "j_max", False, []),  # revision 2 in the hour before the key: J_max
    ({"sampler_method": "window", "created": "2026-12-02T00:00:00Z", "model_kind": "unet",
      "made_on": "cuda: NVIDIA H200 x16"}, "j_max", True, []),  # cuDNN took TF32 then
    ({"sampler_method": "window", "model_kind": "unet", "made_on": "cpu: x86 x2"},
     "j_max", False, []),
    ({"sampler_method": "window", "model_kind": "unet", "torch_version": "2.5.1+cpu"},
     "j_max", False, []),  # a CPU build: no GPU
    ({"sampler_method": "window", "model_kind": "unet", "torch_version": "2.5.1"},
     "j_max", False, ["model.tf32"]),  # a build with CUDA and no device recorded: untold
])
def test_keys_an_older_config_lacks_are_read_as_its_piadm_ran(attrs, theta, tf32, untold):
    text = _without(load_config("jobs/configs/grf.toml").text, "theta", "tf32")
    read = stored_settings(text, attrs)
    assert read.lacked == ["model.tf32", "sampler.theta"]
    assert (read.config.sampler.theta, read.config.model.tf32, read.untold) == (theta, tf32,
                                                                              untold)


def test_a_config_of_this_version_lacks_nothing_and_a_broken_one_reads_as_none():
    assert stored_settings(load_config("jobs/configs/grf.toml").text).lacked == []
    assert stored_settings("[sampler]\nsteps = -1\n") is None
    assert stored_settings("not toml [") is None
