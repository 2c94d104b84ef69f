import argparse

import numpy as np
import pytest

from rwkvsam_core.finetune import FinetuneConfig
from rwkvsam_core.finetune.cli import add_finetune_args, config_from_args
from rwkvsam_core.finetune.prompts import sample_instance_prompts


def _config(*argv: str) -> FinetuneConfig:
    p = argparse.ArgumentParser()
    add_finetune_args(p)
    return config_from_args(p.parse_args(["--data", "d", "--out", "o", *argv]))


def test_defaults_keep_sams_prompt_mix_and_no_quarter_turns() -> None:
    cfg, ref = _config(), FinetuneConfig()
    assert cfg.prompt.mode_probs == pytest.approx(ref.prompt.mode_probs)
    assert cfg.prompt.box_noise == ref.prompt.box_noise and cfg.rot90 is False


def test_prompt_mix_box_noise_and_rot90_reach_the_config_and_the_prompts() -> None:
    cfg = _config("--prompt-mix", "1:0:0", "--box-noise", "0.05", "--rot90")
    assert cfg.prompt.mode_probs == (1.0, 0.0, 0.0) and cfg.prompt.box_noise == 0.05 and cfg.rot90
    again = FinetuneConfig.from_dict(cfg.to_dict())  # as stored in a checkpoint
    assert (
        again.prompt.box_noise == 0.05 and again.rot90 and tuple(again.prompt.mode_probs) == (1.0, 0.0, 0.0)
    )
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    rng = np.random.default_rng(0)
    modes = {sample_instance_prompts(mask, cfg.prompt, rng)["mode"] for _ in range(50)}
    assert modes == {"box"}
    mixed = {sample_instance_prompts(mask, FinetuneConfig().prompt, rng)["mode"] for _ in range(50)}
    assert mixed == {"box", "points", "box+points"}


@pytest.mark.parametrize("bad", ["1:0", "0:0:0", "1:-1:0", "a:b:c", "inf:0:0"])
def test_bad_prompt_mix_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match="--prompt-mix"):
        _config("--prompt-mix", bad)


def test_negative_box_noise_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="--box-noise"):
        _config("--box-noise", "-0.1")
