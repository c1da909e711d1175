"""README.md's dpfl commands, read from README.md itself, so the examples cannot drift: every
command parses (its subcommand and flags exist, its config keys are valid), the budget examples
run as written, and the report examples run on real run folders (`make demo` and its promise:
tests/test_setup.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dpfl.cli import _config_from_args, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def readme_commands() -> list[list[str]]:
    """Every `dpfl ...` command in the README's bash blocks, as argv (after `dpfl`)."""
    out = []
    for block in BLOCK.findall((ROOT / "README.md").read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ", 1)[0].strip()
            words = shlex.split(line) if line and not line.startswith("#") else []
            for i, word in enumerate(words):
                if word.endswith("/dpfl") or word == "dpfl":
                    out.append(words[i + 1 :])
                    break
                if word == "-m" and i + 1 < len(words) and words[i + 1] == "dpfl":
                    out.append(words[i + 2 :])
                    break
    return out


COMMANDS = readme_commands()


def test_the_readme_has_examples_of_every_subcommand():
    assert {c[0] for c in COMMANDS} >= {"simulate", "budget", "report", "audit", "central"}


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_readme_command_parses(argv):
    args = build_parser().parse_args(argv)
    if argv[0] in ("simulate", "central") and not args.config:
        _config_from_args(args)  # its keys and values are valid


def test_the_readme_budget_examples_run(capsys):
    budget = [c for c in COMMANDS if c[0] == "budget"]
    assert len(budget) >= 3
    for argv in budget:
        assert main(argv) == 0, argv
        assert "epsilon" in capsys.readouterr().out


@pytest.mark.long
def test_the_readme_report_examples_run_on_run_folders(tmp_path, capsys, monkeypatch):
    """`dpfl report` as the README writes it, with its run folders made by short runs."""
    monkeypatch.chdir(tmp_path)
    reports = [c for c in COMMANDS if c[0] == "report" and "$" not in " ".join(c)]
    assert reports
    for argv in reports:
        for folder in argv[1:]:
            if not folder.startswith("-") and not Path(folder, "summary.json").exists():
                keys = ["--population", "60", "--cohort-size", "6", "--rounds", "2"]
                keys += ["--examples-per-user", "5", "--quiet", "--run-dir", folder]
                assert main(["simulate", *keys]) == 0
        capsys.readouterr()
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        assert "epsilon (actual" in out and "metrics.png" in out
