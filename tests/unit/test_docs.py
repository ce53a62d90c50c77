"""The README and docs/ as a contract: a front page of at most 200 lines that opens with the two commands, a map
that reaches every page, a floor plan that names every module, and commands whose every flag exists (a renamed
or removed flag fails here, not in a user's shell)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2repro import cli

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LAUNCHERS = [
    "launch/train.py",
    "launch/eval.py",
    "launch/sample.py",
    "launch/export.py",
    "launch/compare.py",
    "data_prep/prepare.py",
]


def commands(page: Path) -> list[str]:
    """The command lines of a page's indented code blocks, continuation lines joined, comments cut."""
    text = re.sub(r"\\\n\s*", " ", page.read_text())
    lines = [line.split(" # ")[0].strip() for line in text.splitlines() if line.startswith("    ") and "--" in line]
    return [command.strip() for line in lines for command in line.split("&&")]


def test_the_readme_is_a_front_page_that_opens_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    blocks = [line.strip() for line in readme.splitlines() if line.startswith("    pip install")]
    assert "pip install torch==2.13.0 && pip install -e . && python data_prep/prepare.py" in blocks[0]
    assert "launch/train.py --config shakespeare-cpu" in blocks[0]  # the main job on its small default
    assert blocks[1] == "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q tests"
    assert 'python -m pytest -q -m "not slow" tests' in readme  # the fast tier


def test_the_map_reaches_every_page_and_every_link_resolves():
    readme = (REPO / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)]+\.md)\)", readme))
    assert linked == {f"docs/{p.name}" for p in PAGES[1:]}
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to {target}, which does not exist"


def test_the_floor_plan_names_every_module():
    layout = (REPO / "docs" / "layout.md").read_text()
    modules = [p.name for p in (REPO / "gpt2repro").glob("*.py") if p.name != "__init__.py"]
    assert [m for m in modules if f"`{m}`" not in layout] == []


def test_every_training_command_shown_parses_with_todays_flags():
    shown = [(page.name, line) for page in PAGES for line in commands(page) if "launch/train.py" in line]
    assert len(shown) >= 15
    for page, line in shown:
        if "..." in line:
            continue  # an elided command
        try:
            cli.parse(line.split("launch/train.py", 1)[1].split())  # a flag that does not exist, or a bad value
        except ValueError as e:
            raise AssertionError(f"{page}: {line}: {e}") from None


@pytest.mark.parametrize("script", LAUNCHERS[1:])
def test_every_flag_shown_for_the_other_entry_points_exists(script):
    shown = {flag for page in PAGES for line in commands(page) if script in line for flag in re.findall(r"--\w+", line)}
    help_text = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True).stdout
    assert help_text
    assert sorted(flag for flag in shown if not re.search(rf"{flag}\b", help_text)) == []
