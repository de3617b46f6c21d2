"""Property-based fuzzing of target strings, joint tables and command lines (hypothesis).

Only the documented outcomes may come out: a valid target or a ``ValueError``; for the command
line, exit code 0, 1 (an ``OSError``), 2 (a usage error or a ``ValueError``) or argparse's
``SystemExit`` with 0 or 2, and stderr one line when the code is not 0. The commands' heavy work
(loading models, training, the Hub) is replaced by a sentinel, so an argument list that gets past
every check ends there.
"""

import contextlib
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusers_fair.method.targets import MAX_CELLS, TargetDistribution


# ---------------------------------------------------------------------------- targets
NAMES = st.sampled_from(["gender", "race", "age", "male", "female", "a", "b", "c", "x y", "", " ", "é", "a:b"])
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    st.sampled_from(["0.5", "1", "0", "-0", "1e999", "nan", "0x10", "1_0", "", "=", "0.5.5"]),
)


@st.composite
def target_strings(draw):
    """Attribute blocks ``name: class[=prob], ...`` joined by ``*``, with separators sometimes doubled or dropped."""
    blocks = []
    for _ in range(draw(st.integers(1, 16))):
        entries = []
        for _ in range(draw(st.integers(0, 4))):
            entry = draw(NAMES)
            if draw(st.booleans()):
                entry += "=" + draw(NUMBERS)
            entries.append(entry)
        blocks.append(draw(NAMES) + draw(st.sampled_from([":", "::", "", ": "])) + ", ".join(entries))
    return draw(st.sampled_from([" * ", "*", "**", ","])).join(blocks)


def check_valid(target):
    assert 1 <= target.num_classes <= MAX_CELLS
    assert torch.isfinite(target.probs).all() and (target.probs >= 0).all()
    assert math.isclose(float(target.probs.sum()), 1.0, abs_tol=1e-6)


@settings(max_examples=300, deadline=None)
@given(st.one_of(target_strings(), st.text(max_size=300)))
def test_target_strings_parse_or_raise_value_error(text):
    try:
        target = TargetDistribution.parse(text)
    except ValueError:
        return
    check_valid(target)


CELL_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**400), 10**400),
                        st.sampled_from([None, "0.5", True, 0.25, 0.5]))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from(["m", "f", "q"]),
                                 st.tuples(st.sampled_from(["m", "f", "q"])),
                                 st.tuples(st.sampled_from(["m", "f"]), st.sampled_from(["y", "o"]))),
                       CELL_VALUES, max_size=5),
       st.booleans())
def test_joint_tables_build_or_raise_value_error(table, two_attributes):
    classes = {"g": ["m", "f"], "a": ["y", "o"]} if two_attributes else {"g": ["m", "f"]}
    try:
        target = TargetDistribution.joint(classes, table)
    except ValueError:
        return
    check_valid(target)


# ---------------------------------------------------------------------------- the command line
class Heavy(Exception):
    """Raised where a command would start its heavy work: every check before it passed."""


def _heavy(*args, **kwargs):
    raise Heavy


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A folder with the files the fuzzed arguments name, and the heavy work patched away."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "prompts.txt").write_text("a photo of the face of a doctor\n")
    (folder / "empty.txt").write_text("# nothing\n")
    (folder / "garbage.pth").write_bytes(bytes(range(256)))
    (folder / "config.yaml").write_text("name: [unclosed\n")
    (folder / "earlier").mkdir()
    (folder / "earlier" / "results.json").write_text("{}")
    (folder / "earlier" / "report.json").write_text("{}")
    (folder / "earlier" / "training_log.jsonl").write_text("{}\n")
    with pytest.MonkeyPatch.context() as patch:
        import diffusers_fair.adaptors.hub as hub
        import diffusers_fair.cli.eval as eval_command
        import diffusers_fair.toy.demo as demo
        import diffusers_fair.toy.experiment as toy_experiment
        import diffusers_fair.training.experiment as experiment

        for module, name in ((eval_command, "_toy_components"), (eval_command, "_real_components"),
                             (demo, "run_demo"), (toy_experiment, "train_toy_experiment"),
                             (experiment, "train_experiment"), (hub, "push_adaptor"), (hub, "pull_adaptor")):
            patch.setattr(module, name, _heavy)
        patch.chdir(folder)
        yield folder


def _argument_lists():
    paths = st.sampled_from(["prompts.txt", "empty.txt", "missing.txt", "garbage.pth", "config.yaml", "earlier",
                             "out", "prompts.txt/out", "", "-", "examples/configs/toy_gender.yaml"])
    numbers = st.sampled_from(["0", "1", "-1", "2", "1.5", "nan", "inf", "-inf", "1e999", "9" * 30, "x", ""])
    options = st.sampled_from(["--prompts", "--out", "--images-per-prompt", "--steps", "--guidance-scale",
                               "--batch-size", "--seed", "--samples", "--model", "--adaptor", "--iterations",
                               "--overwrite", "--quick", "--dry-run", "--resume", "--set", "--joint", "--to",
                               "--revision", "--text-hidden-size", "--target", "--toy"])
    values = st.one_of(paths, numbers, st.sampled_from(["toy", "latest", "training.seed=1", "training.x=1",
                                                        "gender,race", "a: b=1", "toy-gender"]))
    command = st.sampled_from(["eval", "demo", "train", "convert", "push", "pull", "version", "nope"])
    return st.tuples(command, st.lists(st.one_of(options, values), max_size=10)).map(lambda t: [t[0], *t[1]])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=_argument_lists())
def test_random_command_lines_end_in_documented_exit_codes(sandbox, argv):
    from diffusers_fair.cli import main

    if "--help" in argv or "-h" in argv:
        return
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: usage errors
            code = exit_.code
        except Heavy:
            return
    assert code in (0, 1, 2, 130), (argv, code)
    if code != 0:
        assert err.getvalue().count("\n") == 1 and "Traceback" not in err.getvalue(), (argv, err.getvalue())
