"""No dead code in the package: every module-level function and class of gpt2repro/ is used by the product
(the package itself, launch/, benchmarks/, data_prep/, examples/, or a task file lm-eval reads). A second copy of
a decision (config.compile_on_for beside settings.settle's auto, once) is caught here when it stops being called."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("gpt2repro", "launch", "benchmarks", "data_prep", "examples")


def _product_texts() -> list[str]:
    files = [f for root in PRODUCT for f in (REPO / root).rglob("*") if f.suffix in (".py", ".yaml", ".sbatch", ".sh")]
    return [f.read_text() for f in files]


def test_every_module_level_function_and_class_of_the_package_is_used():
    texts = _product_texts()
    unused = []
    for module in sorted((REPO / "gpt2repro").rglob("*.py")):
        for node in ast.parse(module.read_text()).body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            word = re.compile(rf"\b{re.escape(node.name)}\b")
            if sum(len(word.findall(text)) for text in texts) <= 1:  # its own definition only
                unused.append(f"{module.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not unused, "defined but never used by the product: " + ", ".join(unused)
