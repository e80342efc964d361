"""The command line as a hostile or careless user meets it (issue #22): checkpoints from URLs and files that
must not run code, checkpoints of another network, option typos, and errors that say what is wrong without a
traceback. Each error and its test are listed in docs/ERRORS.md."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import Payload, experiment_configs

from lightning_modules.cli import run_cli
from pipeline.cli import main as reproduce

REPO = Path(__file__).resolve().parents[1]
TINY = [*experiment_configs("standard"), "--config", str(REPO / "configs/ci/tiny.yaml")]


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"arch": "fast_cnn"}, "payload": Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> Path:
    """A real checkpoint of the tiny config: one fit of two batches (in this process: seconds)."""
    run_dir = tmp_path_factory.mktemp("trained")
    run_cli(["fit", *TINY, "--data.init_args.data_dir", str(data_dir), "--trainer.limit_train_batches", "1",
             "--run_dir", str(run_dir)])
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[Path, str]]:
    """(a folder, its URL): an HTTP server on 127.0.0.1 that this test starts and stops."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def cli_error(args: list[str], capsys) -> str:
    """Run the CLI in this process; it must stop with the user-error exit code 2. Its stderr."""
    with pytest.raises(SystemExit) as stopped:
        run_cli(args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def with_hparams(source: Path, target: Path, **changes) -> Path:
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["hyper_parameters"].update(changes)
    torch.save(checkpoint, target)
    return target


# ------------------------------------------------------------------------------------------ untrusted files


@pytest.mark.parametrize("subcommand", ["test", "validate", "fit"])
def test_a_malicious_checkpoint_served_over_http_is_refused_without_running_its_payload(
        subcommand, served, tmp_path, monkeypatch, capsys, data_dir):
    folder, url = served
    marker = tmp_path / "payload-ran"
    malicious_checkpoint(folder / "model.ckpt", marker)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # torch.hub's download cache
    err = cli_error([subcommand, *TINY, "--data.init_args.data_dir", str(data_dir), "--run_dir",
                     str(tmp_path / "run"), "--ckpt_path", f"{url}/model.ckpt"], capsys)
    assert not marker.exists(), "the checkpoint's payload ran"
    assert "refusing to load checkpoint" in err and "weights_only=True" in err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_from_a_url_is_loaded_safely_and_tested(trained, served, tmp_path, monkeypatch, capsys,
                                                             data_dir):
    folder, url = served
    shutil.copy(trained, folder / "good.ckpt")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cli = run_cli(["test", *TINY, "--data.init_args.data_dir", str(data_dir), "--run_dir", str(tmp_path / "run"),
                   "--ckpt_path", f"{url}/good.ckpt"])
    assert cli.config.test.weights_only is True  # Lightning's own load of the URL is restricted too
    assert 0 <= cli.trainer.callback_metrics["test/acc"] <= 1


def test_weights_only_false_is_refused(trained, tmp_path, capsys):
    err = cli_error(["test", *TINY, "--ckpt_path", str(trained), "--weights_only", "false",
                     "--run_dir", str(tmp_path / "run")], capsys)
    assert "--weights_only false is refused" in err


def test_a_checkpoint_naming_a_class_outside_the_suite_is_refused_before_its_module_is_imported(
        trained, tmp_path, capsys):
    sys.modules.pop("this", None)  # the standard library's `this` prints the Zen of Python when imported
    bad = with_hparams(trained, tmp_path / "this.ckpt", _class_path="this.Zen")
    err = cli_error(["test", *TINY, "--ckpt_path", str(bad), "--run_dir", str(tmp_path / "run")], capsys)
    assert "'this.Zen', which is not one of the suite's LightningModules" in err
    assert "this" not in sys.modules
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("changes", "named"), [
    ({"arch": "resnet18", "arch_kwargs": {}}, "arch='resnet18' (config: 'fast_cnn')"),
    ({"num_classes": 100}, "num_classes=100 (config: 10)"),
])
def test_a_checkpoint_of_another_network_is_refused_naming_both_sides(changes, named, trained, tmp_path, capsys):
    bad = with_hparams(trained, tmp_path / "other.ckpt", **changes)
    err = cli_error(["test", *TINY, "--ckpt_path", str(bad), "--run_dir", str(tmp_path / "run")], capsys)
    assert "holds another network than the config builds" in err and named in err
    assert "config.yaml" in err  # the fix: the config it was trained with


def test_a_checkpoint_trained_with_other_optimiser_settings_is_tested_with_a_note(trained, tmp_path, capsys,
                                                                                  data_dir):
    other = with_hparams(trained, tmp_path / "lr.ckpt", lr=0.123)
    cli = run_cli(["test", *TINY, "--data.init_args.data_dir", str(data_dir), "--ckpt_path", str(other),
                   "--run_dir", str(tmp_path / "run")])
    assert cli.model.hparams.lr == 0.05  # the config's, not the checkpoint's
    assert "was trained with lr=0.123 (config: 0.05); the config's values are used" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["text", "truncated", "directory", "missing", "no_state_dict"])
def test_unusable_checkpoint_files_are_named_with_the_problem(damage, trained, tmp_path, capsys):
    path = tmp_path / "bad.ckpt"
    if damage == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif damage == "truncated":
        path.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    elif damage == "directory":
        path.mkdir()
    elif damage == "no_state_dict":
        torch.save({"weights": torch.zeros(3)}, path)
    err = cli_error(["test", *TINY, "--ckpt_path", str(path), "--run_dir", str(tmp_path / "run")], capsys)
    expected = {"text": "is not a PyTorch checkpoint", "truncated": "is damaged or truncated",
                "directory": "is not a file", "missing": "not found", "no_state_dict": "needs a 'state_dict'"}
    assert str(path) in err and expected[damage] in err


# ------------------------------------------------------------------------------------ errors a person can read


def test_a_user_error_prints_its_cause_and_fix_without_a_traceback_unless_asked(tmp_path):
    command = [sys.executable, str(REPO / "train.py"), "fit", *TINY, "--model.init_args.lr", "-1",
               "--run_dir", str(tmp_path / "run")]
    plain = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-2].startswith("error: lr must be > 0, got -1.0; fix model.init_args.lr")
    assert len(plain.stderr.strip().splitlines()) <= 4
    debug = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120,
                           env={**__import__("os").environ, "BOF_TRACEBACK": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "lr must be > 0" in debug.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--model.init_args.lrr", "1"], "Option 'lrr' is not accepted. Did you mean 'lr'?"),
    (["--data.init_args.batch_sise", "8"], "Option 'batch_sise' is not accepted. Did you mean 'batch_size'?"),
    (["--trainer.devcies", "2"], "unrecognized arguments: --trainer.devcies 2. Did you mean 'trainer.devices'?"),
])
def test_option_typos_get_a_short_error_with_did_you_mean(args, expected, capsys):
    err = cli_error(["fit", *TINY, *args], capsys)
    assert expected in err
    assert "Does not validate against any of the Union subtypes" not in err and "usage:" not in err
    assert len(err.strip().splitlines()) <= 3


def test_a_typo_key_in_a_config_file_gets_did_you_mean(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  devcies: 2\n")
    err = cli_error(["fit", *TINY, "--config", str(typo)], capsys)
    assert "'trainer.devcies'" in err and "Did you mean 'trainer.devices'?" in err


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  class_path: lightning_modules.ClassifierModule\n   init_args: [1\n")
    err = cli_error(["fit", "--config", str(broken)], capsys)
    assert f"config file {broken}, line 3, column" in err and "invalid YAML" in err
    assert "<unicode string>" not in err
    err = cli_error(["fit", "--config", str(tmp_path / "absent.yaml")], capsys)
    assert "absent.yaml not found" in err


def test_a_run_dir_under_a_regular_file_is_refused_before_anything_is_written(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = cli_error(["fit", *TINY, "--run_dir", str(blocker / "run")], capsys)
    assert f"{blocker} is a file, not a directory" in err


# ------------------------------------------------------------------------------------------------ reproduce


def test_reproduce_dry_run_parses_every_stage_command_and_stops_at_a_typo(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        reproduce(["--preset", "tiny", "--out", str(out), "--dry-run", "--stage-args", "--trainer.devcies 2"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "stage 'standard': its fit command would fail" in err and "Did you mean 'trainer.devices'?" in err
    assert not out.exists()
    reproduce(["--preset", "tiny", "--out", str(out), "--dry-run"])  # and without the typo every command parses
    assert "commands of" in capsys.readouterr().out and not out.exists()


def test_reproduce_stops_at_a_typo_before_the_first_stage_runs(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        reproduce(["--preset", "tiny", "--out", str(out), "--trainer.max_epohcs", "1", "--no-report"])
    assert "Did you mean 'trainer.max_epochs'?" in capsys.readouterr().err
    assert not out.exists()  # no stage ran, no folder was made


def test_reproduce_out_under_a_regular_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        reproduce(["--preset", "tiny", "--out", str(blocker / "out"), "--dry-run"])
    assert f"{blocker} is a file, not a directory" in capsys.readouterr().err
