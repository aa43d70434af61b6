"""The three CLIs' --help: every flag says what it does (mlx-lm's CLIs do)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cli", ["train.py", "generate.py", "convert.py"])
def test_every_flag_has_help(cli):
    spec = importlib.util.spec_from_file_location(cli[:-3] + "_cli", ROOT / cli)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flags = [a for a in module.parser()._actions if a.dest != "help"]
    assert flags and [a.option_strings for a in flags if not (a.help or "").strip()] == []
    assert "usage:" in module.parser().format_help()
