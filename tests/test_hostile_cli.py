"""Hostile and careless use of the command line.

One rule for every command: a usage error, a ``ValueError`` and an ``OSError`` about a user's path
print one line on stderr and exit non-zero (2 for usage errors), never a traceback; an interrupt
prints one line and exits 130. A folder that holds earlier results is not written over without
``--overwrite``; with it, the old results are replaced whole at the end, and an interrupted run
leaves them as they were.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_fair.cli import main


ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "diffusers_fair" / "adaptors" / "shipped"
TOY_CONFIG = ROOT / "examples" / "configs" / "toy_gender.yaml"


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def leftovers(folder: Path):
    """Hidden staging or backup siblings of ``folder``."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def eval_args(tmp_path, *extra, prompts=None, out=None):
    if prompts is None:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a photo of the face of a doctor\n")
    return ["eval", "--model", "toy", "--prompts", str(prompts), "--images-per-prompt", "1",
            "--out", str(out or tmp_path / "out"), "--no-progress", "--device", "cpu", *extra]


# ---------------------------------------------------------------------------- end to end, in a new process
def run_cli(*argv, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "diffusers_fair.cli", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_missing_prompt_file_is_one_line_and_exit_code_2(tmp_path):
    done = run_cli(*eval_args(tmp_path, prompts=tmp_path / "missing.txt"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "prompt file" in done.stderr and "missing.txt does not exist" in done.stderr


def _default_sigint():
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored:
    # the command under test gets the default handling, as in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_ends_with_one_line_and_code_130_and_keeps_the_earlier_results(tmp_path):
    out = tmp_path / "demo-out"
    out.mkdir()
    (out / "report.json").write_text("{}")  # an earlier demo's results
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "diffusers_fair.cli", "demo", "--quick", "--overwrite",
                                "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        assert "[1/3]" in process.stdout.readline()  # the first audit has started
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "diffusers-fair demo: interrupted" and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["report.json"] and leftovers(out) == []


# ---------------------------------------------------------------------------- the rule, in-process
@pytest.mark.parametrize("extra, words", [
    (["--steps", "0"], ["--steps", "at least 1, got 0"]),
    (["--steps", "-3"], ["--steps", "at least 1"]),
    (["--steps", "1.5"], ["--steps", "expected an integer"]),
    (["--guidance-scale", "nan"], ["--guidance-scale", "finite number >= 1"]),
    (["--guidance-scale", "inf"], ["--guidance-scale", "finite number >= 1"]),
    (["--guidance-scale", "0.5"], ["--guidance-scale", "finite number >= 1"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--seed", "-1"], ["--seed"]),
    (["--seed", "9" * 40], ["--seed", "too large"]),
])
def test_numeric_arguments_are_checked_by_argparse(tmp_path, capsys, extra, words):
    with pytest.raises(SystemExit) as exit_info:
        main(eval_args(tmp_path, *extra))
    assert exit_info.value.code == 2
    one_line_error(capsys, "diffusers-fair eval: error: argument", *words)
    assert not (tmp_path / "out").exists()


def test_other_numeric_arguments(tmp_path, capsys):
    for argv in (["demo", "--iterations", "0"], ["eval", "--images-per-prompt", "0"],
                 ["convert", "a", "b", "--text-hidden-size", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "error: argument" in capsys.readouterr().err


def test_unreadable_prompt_files(tmp_path, capsys):
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    for prompts, words in ((tmp_path / "missing.txt", ["does not exist"]), (folder, ["cannot be read"]),
                           (latin, ["not UTF-8 text"])):
        assert main(eval_args(tmp_path, prompts=prompts)) == 2
        one_line_error(capsys, "diffusers-fair eval: error: prompt file", *words)


def test_eval_output_folder_checks(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(eval_args(tmp_path, out=blocker)) == 2
    one_line_error(capsys, "is a file, not a folder")
    assert main(eval_args(tmp_path, out=blocker / "out")) == 2
    one_line_error(capsys, "cannot be created")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}")
    assert main(eval_args(tmp_path, out=earlier)) == 2
    one_line_error(capsys, "holds the results of an earlier audit (results.json)", "--overwrite")


def test_a_truncated_cache_file_is_named(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    cache = tmp_path / "out" / "prompts"
    cache.mkdir(parents=True)
    save_file({"model/found": torch.ones(4, dtype=torch.uint8)}, str(cache / "abc.safetensors"))
    data = (cache / "abc.safetensors").read_bytes()
    (cache / "abc.safetensors").write_bytes(data[:-3])
    assert main(eval_args(tmp_path)) == 2
    one_line_error(capsys, "abc.safetensors is truncated or corrupt", "remove it")
    (cache / "abc.safetensors").write_bytes(data)
    (cache / "abc.json").write_text('{"prompt": "a photo')
    assert main(eval_args(tmp_path)) == 2
    one_line_error(capsys, "abc.json is truncated or corrupt")


def test_interrupts_and_os_errors_are_one_line(monkeypatch, capsys):
    from diffusers_fair.cli import version

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(version, "run", interrupted)
    assert main(["version"]) == 130
    assert capsys.readouterr().err == "diffusers-fair version: interrupted\n"

    def disk_full(args):
        raise OSError(28, "No space left on device", "/some/file")

    monkeypatch.setattr(version, "run", disk_full)
    assert main(["version"]) == 1
    one_line_error(capsys, "No space left on device", "/some/file")

    def multi_line(args):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr(version, "run", multi_line)
    assert main(["version"]) == 2
    one_line_error(capsys, "first line second line")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a zip", bytes(range(256)) * 3])
def test_convert_refuses_garbage_pth_files_in_one_line(tmp_path, capsys, content):
    src = tmp_path / "release"
    src.mkdir()
    (src / "text_encoder_lora_EMA.pth").write_bytes(content)
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 2
    one_line_error(capsys, "diffusers-fair convert: error:", "text_encoder_lora_EMA.pth")
    assert not (tmp_path / "dst").exists()


def test_push_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "toy-gender"
    shutil.copytree(SHIPPED / "toy-gender", folder)
    code = main(["push", str(folder), "someone/toy-gender"])
    assert code in (1, 2)
    one_line_error(capsys, "diffusers-fair push: error:")


# ---------------------------------------------------------------------------- earlier results and --overwrite
def test_eval_overwrite_replaces_the_results_whole_and_an_interrupt_keeps_the_old_ones(tmp_path, capsys, monkeypatch):
    import diffusers_fair.evaluation.report as report

    out = tmp_path / "out"
    assert main(eval_args(tmp_path, "--steps", "2")) == 0
    first = (out / "results.json").read_text()
    (out / "note.txt").write_text("left by the earlier audit")
    capsys.readouterr()

    write_report = report.write_report

    def interrupted(result, out_dir, **kwargs):
        write_report(result, out_dir, **kwargs)
        raise KeyboardInterrupt  # after the new report was written into the staging folder

    monkeypatch.setattr(report, "write_report", interrupted)
    assert main(eval_args(tmp_path, "--steps", "3", "--overwrite")) == 130
    assert (out / "results.json").read_text() == first and (out / "note.txt").exists()
    assert leftovers(out) == []

    monkeypatch.setattr(report, "write_report", write_report)
    assert main(eval_args(tmp_path, "--steps", "3", "--overwrite")) == 0
    assert (out / "results.json").read_text() != first and '"num_inference_steps": 3' in (out / "results.json").read_text()
    assert not (out / "note.txt").exists() and leftovers(out) == []


def test_demo_checks_its_folder_and_settings_before_the_first_audit(tmp_path, capsys, monkeypatch):
    import diffusers_fair.toy.demo as demo

    def no_audit(*args, **kwargs):
        raise AssertionError("audited before checking")

    monkeypatch.setattr(demo, "audit_base_model", no_audit)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker)]) == 2
    one_line_error(capsys, "is a file, not a folder")
    with pytest.raises(ValueError, match="cannot be written"):
        demo.run_demo(blocker / "out", demo.DemoSettings.quick())
    for field, value in (("num_words", 0), ("num_words", 10**6), ("images_per_word", -1), ("images_per_word", 2.5)):
        with pytest.raises(ValueError, match=field):
            demo.run_demo(tmp_path / "fine", demo.DemoSettings(**{field: value}))
    with pytest.raises(ValueError, match="num_iterations"):
        demo.run_demo(tmp_path / "fine", demo.DemoSettings(iterations=0))


def test_demo_refuses_earlier_results_and_overwrite_swaps_at_the_end(tmp_path, capsys, monkeypatch):
    import diffusers_fair.toy.demo as demo

    out = tmp_path / "demo-out"
    out.mkdir()
    (out / "report.json").write_text('{"old": true}')
    assert main(["demo", "--out", str(out)]) == 2
    one_line_error(capsys, "holds the results of an earlier demo (report.json)", "--overwrite")

    def fake_demo(folder, settings):
        (Path(folder) / "report.json").write_text('{"new": true}')
        assert (out / "report.json").read_text() == '{"old": true}'  # the old results stay until the end
        if settings.iterations == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", fake_demo)
    assert main(["demo", "--out", str(out), "--overwrite", "--iterations", "1"]) == 130
    assert (out / "report.json").read_text() == '{"old": true}' and leftovers(out) == []
    assert main(["demo", "--out", str(out), "--overwrite", "--iterations", "2"]) == 0
    assert (out / "report.json").read_text() == '{"new": true}' and leftovers(out) == []


def test_train_refuses_a_folder_with_an_earlier_run(tmp_path, capsys, monkeypatch):
    import diffusers_fair.toy.experiment as toy_experiment

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "training_log.jsonl").write_text('{"iteration": 1}\n')
    for extra in ([], ["--dry-run"]):
        assert main(["train", str(TOY_CONFIG), "--out", str(out), *extra]) == 2
        one_line_error(capsys, "holds an earlier run (training_log.jsonl, checkpoints)", "--resume latest", "--overwrite")
    assert main(["train", str(TOY_CONFIG), "--out", str(out), "--overwrite", "--resume", "latest"]) == 2
    one_line_error(capsys, "give one of them")
    assert main(["train", str(TOY_CONFIG), "--out", str(out), "--resume", "latest", "--dry-run"]) == 0
    capsys.readouterr()

    def fake_train(experiment):
        folder = Path(experiment.config.output_dir)
        assert not (folder / "training_log.jsonl").exists()  # the earlier run is out of the way
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "training_log.jsonl").write_text('{"iteration": 1, "new": true}\n')
        if experiment.config.num_iterations == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(toy_experiment, "train_toy_experiment", fake_train)
    argv = ["train", str(TOY_CONFIG), "--out", str(out), "--overwrite", "--set"]
    assert main([*argv, "training.num_iterations=1"]) == 130
    assert (out / "training_log.jsonl").read_text() == '{"iteration": 1}\n' and (out / "checkpoints").is_dir()
    assert leftovers(out) == []
    assert main([*argv, "training.num_iterations=2"]) == 0
    assert "new" in (out / "training_log.jsonl").read_text() and not (out / "checkpoints").exists()
    assert leftovers(out) == []
