"""contrastkit.validation: the one family of argument checks every part uses (config sections, augmentation policies,
method, loss, dataset and plug-in options); each bad value is one line naming the key, the value and the rule."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from contrastkit.augment.policy import ViewPolicy
from contrastkit.errors import ConfigError, DataError
from contrastkit.validation import check_value, known_options, number_in, number_pair


@pytest.mark.parametrize("value", [True, math.nan, math.inf, -math.inf, "0.5", None, -0.1, 1.5])
def test_number_in_refuses(value) -> None:
    with pytest.raises(ConfigError, match=r"^x must be a number in \[0, 1\], got "):
        number_in(value, "x", 0.0, 1.0)


def test_number_in_accepts_the_closed_interval_and_no_upper_bound() -> None:
    assert number_in(0, "x", 0.0, 1.0) == 0.0 and number_in(1, "x", 0.0, 1.0) == 1.0
    assert number_in(1e9, "x", 0.0, math.inf) == 1e9
    with pytest.raises(ConfigError, match=r"\[0, inf\]"):
        number_in(math.inf, "x", 0.0, math.inf)  # "no upper bound" still means a finite number


@pytest.mark.parametrize("value", [(0.0, 1.0), (0.5, 0.4), (0.2, 1.1), (0.2,), "ab", (0.1, math.nan), (True, 1.0)])
def test_number_pair_refuses(value) -> None:
    with pytest.raises(ConfigError, match=r"^s must be a \(min, max\) pair with 0 < min <= max <= 1, got "):
        number_pair(value, "s", 0.0, 1.0, open_low=True)


def test_number_pair_accepts() -> None:
    assert number_pair([0.2, 1], "s", 0.0, 1.0, open_low=True) == (0.2, 1.0)
    assert number_pair((0.0, 0.0), "s", 0.0, 1.0) == (0.0, 0.0)  # closed lower bound
    with pytest.raises(ConfigError, match=r"0 < min <= max, got"):  # no "<= inf" in the rule
        number_pair((1.0, math.inf), "r", 0.0, math.inf, open_low=True)


def test_view_policy_errors_come_from_the_shared_checks() -> None:
    with pytest.raises(ConfigError, match=r"^ViewPolicy.crop_scale must be a \(min, max\) pair with 0 < min <= max <= 1"):
        ViewPolicy(crop_scale=(0.0, 1.0)).validate()
    with pytest.raises(ConfigError, match=r"^ViewPolicy.hue must be a number in \[0, 0.5\], got 0.6"):
        ViewPolicy(hue=0.6).validate()
    with pytest.raises(ConfigError, match=r"^ViewPolicy.brightness must be a number in \[0, inf\], got inf"):
        ViewPolicy(brightness=math.inf).validate()


def test_check_value() -> None:
    check_value(True, "k", 1, "anything")
    with pytest.raises(ConfigError, match=r"^invalid value -1 for optim.lr: expected a number > 0$"):
        check_value(False, "optim.lr", -1, "a number > 0")


def test_known_options_names_the_first_unknown_and_the_valid_ones() -> None:
    known_options({"a": 1}, ["a", "b"], "p")
    with pytest.raises(ConfigError, match=r"^unknown option p.c of thing; valid options: a, b$"):
        known_options({"d": 1, "c": 2}, ["a", "b"], "p", "thing")
    with pytest.raises(DataError, match=r"^unknown option data.options.n; valid options: none$"):
        known_options(["n"], [], "data.options", error=DataError)


def test_every_option_family_reports_unknown_options_alike() -> None:
    from torch import nn

    from contrastkit.config import MethodConfig
    from contrastkit.losses import build_loss
    from contrastkit.methods import build_method
    from contrastkit.plugins import PLUGINS

    with pytest.raises(ConfigError, match=r"^unknown option method.options.x of moco; valid options: bn_splits$"):
        build_method(nn.Flatten(), 8, MethodConfig(name="moco", options={"x": 1}))
    with pytest.raises(ConfigError, match=r"^unknown option loss.x of dclw; valid options: temperature, sigma"):
        build_loss("dclw", x=1)
    with pytest.raises(ConfigError, match=r"^unknown option plugins.ascl.x; valid options: "):
        PLUGINS["ascl"].parse_options({"x": 1})


def test_reading_a_configuration_does_not_import_torch() -> None:
    code = "import sys, contrastkit.config, contrastkit.validation; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
