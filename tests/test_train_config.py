"""Trainer config: YAML + overrides through OmegaConf, and clear errors naming the bad key or value."""

from __future__ import annotations

from pathlib import Path

import pytest

from omninft_fast.cli import main
from omninft_fast.train.config import ConfigError, TrainConfig, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "name",
    [
        "cpu_default.yaml",
        "cpu_official.yaml",
        "micro.yaml",
        "ltx2_19b_example.yaml",
        "ltx2_19b_official.yaml",
        "ltx2_19b_paper.yaml",
        "ltx2_19b_fsdp2_8gpu.yaml",
        "ltx2_19b_zero3_16gpu.yaml",
    ],
)
def test_shipped_configs_parse_and_round_trip(name: str, tmp_path: Path) -> None:
    config = load_config(CONFIGS / name)
    assert config.rewards and config.iterations > 0
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_overrides_reach_nested_fields_and_lists() -> None:
    config = load_config(CONFIGS / "micro.yaml", ["nft.beta=0.25", "rewards.1.weight=2", "surgery.spec='0-1:0.3'"])
    assert config.nft.beta == 0.25 and config.rewards[1].weight == 2.0 and config.surgery.spec == "0-1:0.3"
    assert config.iterations == 2  # from the file
    config = load_config(CONFIGS / "micro.yaml", ["rewards=[{name: synthetic_pitch}]", "task.frames=16"])
    assert [r.name for r in config.rewards] == ["synthetic_pitch"] and config.task.frames == 16
    assert config.task.patch == 2  # the rest of the section is the file's


def test_a_mapping_override_replaces_a_plain_mapping_and_merges_into_a_section() -> None:
    """``rewards.N.outputs`` (a plain mapping) is the override's whole; a section keeps the keys not given."""
    base = ["rewards=[{name: synthetic_colour, outputs: {colour: 1.0}}]"]
    assert load_config(CONFIGS / "micro.yaml", [*base, "rewards.0.outputs={}"]).rewards[0].outputs == {}
    config = load_config(CONFIGS / "micro.yaml", [*base, "rewards.0.outputs={pitch: 2.0}"])
    assert config.rewards[0].outputs == {"pitch": 2.0}
    config = load_config(CONFIGS / "micro.yaml", ["nft={beta: 0.5}"])
    assert config.nft.beta == 0.5 and config.nft.mini_batch == 4  # the file's


def test_values_follow_yaml_1_2_and_the_field_type() -> None:
    config = load_config(CONFIGS / "micro.yaml", ["optim.lr=1e-4", "surgery.spec=1:0.5", "nft.kl_weight=1"])
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)
    assert config.surgery.spec == "1:0.5"  # YAML 1.1 would read base 60 (60.5)
    assert config.nft.kl_weight == 1.0 and isinstance(config.nft.kl_weight, float)


def test_ladder_preset_is_applied_recorded_and_validate_does_not_mutate(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "cpu_default.yaml", ["ladder=vanilla"])
    assert config.ladder == "vanilla"
    assert (config.advantage.routing, config.surgery.enabled, config.reweight.enabled) == ("gdpo", False, False)
    config.validate()
    assert config.ladder == "vanilla" and config.surgery.enabled is False
    save_config(config, tmp_path / "config.yaml")
    assert "ladder: vanilla" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml") == config
    with pytest.raises(ConfigError, match=r"ladder=vanilla sets .*'surgery.enabled': False"):
        TrainConfig(ladder="vanilla")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["nft.bta=1"], r"unknown config key 'nft.bta' \(.*Did you mean: 'beta'"),
        (["learning_rate=1"], r"unknown config key 'learning_rate'"),
        (["rewards=[{nam: synthetic_pitch}]"], r"unknown config key 'rewards.nam'"),
        (["nft.beta=fast"], r"nft.beta: Value 'fast' of type 'str' could not be converted to Float"),
        (["group_size=2.5"], r"group_size: Value '2.5' of type 'float' could not be converted to Integer"),
        (["surgery.enabled=maybe"], r"surgery.enabled: Value 'maybe' is not a valid bool"),
        (["seed=null"], r"seed: "),
        (["advantage.routing=sum"], r"advantage.routing must be one of"),
        (["ladder=best"], r"ladder must be one of"),
        (["optim.lr=0"], r"optim.lr must be > 0"),
        (["surgery.alpha=1.5"], r"surgery.alpha must be in \[0, 1\]"),
        (["group_size=1"], r"group_size must be >= 2"),
        (["reweight.last_steps=99"], r"reweight.last_steps \(99\) must be <= sampling.num_steps"),
        (["rewards.7.weight=1"], r"rewards.7: index must be in 0..2"),
        (["nft.beta.x=1"], r"nft.beta is a value, not a section"),
        (["nft.beta=[1"], r"override 'nft.beta=\[1' is not valid YAML"),
        (["novalue"], r"must look like key=value"),
        (["nft.x0_norm=true"], r"nft.x0_norm replaces nft.adaptive_weight"),
        (["nft.kl_space=x0"], r"nft.kl_space=x0 needs nft.x0_norm=true"),
        (["nft.kl_space=x1"], r"nft.kl_space must be one of"),
        (["nft.modality_reduction=max"], r"nft.modality_reduction must be one of"),
        (["nft.policy_scale=0"], r"nft.policy_scale must be > 0"),
        (["nft.video_weight=0", "nft.audio_weight=0"], r"nft.video_weight \+ nft.audio_weight must be > 0"),
        (["nft=[1]"], r"^nft takes a dict like nft=\{name: value\}, got list '\[1\]'$"),
        (
            ["sampling.stg_blocks={a: 1}"],
            r"^sampling.stg_blocks takes a list like sampling.stg_blocks=\[a, b\], got dict",
        ),
        (["rewards.0.outputs=[VQ]"], r"^rewards.0.outputs takes a dict like"),
        (["prompts={a: 1}"], r"^prompts: "),
        (["rewards.0.weight=abc"], r"^rewards.0.weight: Value 'abc' of type 'str' could not be converted to Float$"),
        (["rewards.0.bogus=1"], r"^unknown config key 'rewards.0.bogus' "),
        (["rewards.0.outputs={colour: abc}"], r"^rewards.0.outputs.colour: Value 'abc'"),
        (["rewards.0.outputs.colour.w=1"], r"^rewards.0.outputs.colour must be a number, got \{'w': 1\}$"),
        (["finetune.lora_targets.0=[1]"], r"^finetune.lora_targets.0 must be a string, got \[1\]$"),
        (["rewards.1.device=foo"], r"^rewards.1.device must name a torch device such as cpu or cuda:0, got 'foo'$"),
        (["ltx.decoder_device=gpu"], r"^ltx.decoder_device must name a torch device"),
        (["optim.beta1=1.5"], r"^optim.beta1 must be in \[0, 1\), got 1.5$"),
        (["optim.eps=-1"], r"^optim.eps must be >= 0, got -1.0$"),
        (["fp8.modules=("], r"^fp8.modules '\(' is not a regular expression \(missing \), unterminated subpattern"),
        (["model.num_layers=-2"], r"^model.num_layers must be > 0, got -2$"),
        (["eval.write_samples=-1"], r"^eval.write_samples must be >= 0, got -1$"),
        (["output_dir=''"], r"^output_dir must name a folder, got ''$"),
        (["model.video_head_dim=0"], r"^model.video_head_dim must be > 0, got 0$"),
        (
            ["model.kind=ltx", "model.checkpoint=m.safetensors", "ltx.text_cache=t.safetensors", "autocast=off"],
            r"^ltx.dtype=bfloat16 needs autocast=bf16 \(or auto on a CUDA device\)",
        ),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(CONFIGS / "micro.yaml", overrides)
    assert "\n" not in str(caught.value)


def test_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nft:\n  betta: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'nft.betta'"):
        load_config(bad)
    bad.write_text("nft:\n  beta: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' is not valid YAML at line 3"):
        load_config(bad)
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping, got list"):
        load_config(bad)


def test_cli_reports_config_errors_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(CONFIGS / "micro.yaml"), "nft.beta=-1"]) == 2
    assert capsys.readouterr().err == "config error: nft.beta must be > 0, got -1.0\n"
    with pytest.raises(ConfigError, match="nft.beta must be > 0"):  # --debug shows the traceback
        main(["train", "--debug", "--config", str(CONFIGS / "micro.yaml"), "nft.beta=-1"])
    assert main(["train", "--config", str(CONFIGS / "micro.yaml"), "nft.bta=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: unknown config key 'nft.bta'") and err.count("\n") == 1
