"""Trainer config: YAML + overrides, and clear errors naming the bad key or value."""

from __future__ import annotations

from pathlib import Path

import pytest

from omninft_fast.cli import main
from omninft_fast.train.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["cpu_default.yaml", "micro.yaml", "ltx2_19b_example.yaml"])
def test_shipped_configs_parse(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.rewards and config.iterations > 0


def test_overrides_reach_nested_fields_and_lists() -> None:
    config = load_config(CONFIGS / "micro.yaml", ["nft.beta=0.25", "rewards.1.weight=2", "surgery.spec='0-1:0.3'"])
    assert config.nft.beta == 0.25 and config.rewards[1].weight == 2.0 and config.surgery.spec == "0-1:0.3"
    assert config.iterations == 2  # from the file


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["nft.bta=1"], r"unknown config key 'nft.bta'"),
        (["learning_rate=1"], r"unknown config key 'learning_rate'"),
        (["nft.beta=fast"], r"nft.beta must be a number, got 'fast'"),
        (["group_size=2.5"], r"group_size must be an integer"),
        (["surgery.enabled=maybe"], r"surgery.enabled must be true or false"),
        (["advantage.routing=sum"], r"advantage.routing must be one of"),
        (["ladder=best"], r"ladder must be one of"),
        (["optim.lr=0"], r"optim.lr must be > 0"),
        (["surgery.alpha=1.5"], r"surgery.alpha must be in \[0, 1\]"),
        (["group_size=1"], r"group_size must be >= 2"),
        (["reweight.last_steps=99"], r"reweight.last_steps \(99\) must be <= sampling.num_steps"),
        (["rewards.7.weight=1"], r"rewards.7: index must be in 0..2"),
        (["nft.beta.x=1"], r"nft.beta is a value, not a section"),
        (["novalue"], r"must look like key=value"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "micro.yaml", overrides)


def test_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nft:\n  betta: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'nft.betta'"):
        load_config(bad)


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(CONFIGS / "micro.yaml"), "nft.beta=-1"]) == 2
    assert "config error: nft.beta must be > 0" in capsys.readouterr().err
