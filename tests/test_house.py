"""The size and shape of the code outside tests/, as the house rules set them: lines in all and per module, flags
per training script, no import circle between the repository's modules, no call with a row of positional arguments.
Run alone (``python -m pytest -q tests/test_house.py``) it is the measure of the house."""
import ast

import pytest

import mae_pretrain
import train_classifier
from conftest import REPO

MAX_MODULE_LINES, MAX_FLAGS, MAX_POSITIONAL = 450, 32, 6
MAX_LINES = 3_596  # the goal was 3,600; this is where the code stands (2026-12-07), and it may only shrink
MAX_EPOCH_LINES = 400  # one pretraining epoch, read in the script and the engine


def sources():
    return {path.stem: path.read_text() for path in sorted(REPO.glob("*.py"))}  # every module is at the top level


def test_lines_in_all_and_per_module():
    lines = {name: len(text.splitlines()) for name, text in sources().items()}
    assert sum(lines.values()) <= MAX_LINES, sorted(lines.items(), key=lambda item: -item[1])
    assert {name: n for name, n in lines.items() if n > MAX_MODULE_LINES} == {}


def test_one_pretraining_epoch_reads_in_two_files():
    code = sources()
    assert {"def train_epoch", "class BudgetSchedule", "def make_pretrain_step"} <= {
        line.strip().split("(")[0] for line in code["engine"].splitlines()}
    assert len(code["mae_pretrain"].splitlines()) + len(code["engine"].splitlines()) < MAX_EPOCH_LINES


@pytest.mark.parametrize("script", [mae_pretrain, train_classifier])
def test_flags_per_training_script(script):
    flags = [a for a in script.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(flags) <= MAX_FLAGS, [a.option_strings[0] for a in flags]


def imports(text, modules):
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names & modules


def test_no_import_circle():
    code = sources()
    graph = {name: imports(text, set(code)) for name, text in code.items()}
    state = {}

    def visit(name, path):
        if state.get(name) == "open":
            pytest.fail(f"import circle: {' -> '.join(path + [name])}")
        if state.get(name) is None:
            state[name] = "open"
            for other in sorted(graph[name]):
                visit(other, path + [name])
            state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_no_call_takes_more_than_six_positional_arguments():
    rows = [f"{name}.py:{node.lineno}" for name, text in sources().items() for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.Call) and len(node.args) > MAX_POSITIONAL]
    assert rows == []
