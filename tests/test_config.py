"""core.config: the typed run configuration and the rules between settings (issue 15)."""
from __future__ import annotations

from core import sweeps as S
from core.config import RunConfig, validate_config
from core.store import Run


def test_scratch_is_recorded_as_random_init(tmp_path):
    cfg = validate_config(dict(data_root="x", freeze="scratch", weights="auto", weights_file="w.pth"))
    assert (cfg.weights, cfg.weights_file) == ("random", None)
    run = Run.create(RunConfig(data_root="x", arch="test_resnet", freeze="scratch"), root=tmp_path)
    assert run.config.weights == "random"


def test_a_freeze_sweep_from_a_scratch_base_uses_pretrained_weights():
    """Report 002's preset trains from scratch; sweeping its freeze mode must not give a head-only
    run on a random backbone."""
    base = RunConfig(data_root="x", arch="test_resnet", freeze="scratch", weights="random")
    runs = {cfg.freeze: cfg for cfg in S.expand(base, {"freeze": ["head", "full", "scratch"]})}
    assert runs["head"].weights == runs["full"].weights == "auto"
    assert runs["scratch"].weights == "random"


def test_the_config_module_is_the_single_source_of_ranges_and_choices():
    from core import config, store
    assert store.RunConfig is config.RunConfig
    assert "lr" in config.RANGES and "optimizer" in config.CHOICES
    assert validate_config({"scheduler": "none"}).scheduler == "none"
