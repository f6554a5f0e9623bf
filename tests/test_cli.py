"""The ``bnrs`` console script: dispatch to study and bench, and study's arguments."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import sys
import types

import bnrs
import pytest
from bnrs import cli
from bnrs.study import runner, storage


def test_study_arguments_parse():
    args = cli.study_parser().parse_args(
        ["--quick", "--questions", "1", "2", "6", "--dataset", "fashion-mnist", "--seeds",
         "3", "--epochs", "4", "--out", "here", "--n-jobs", "2", "--scale", "2.5",
         "--backend", "dask", "--scheduler", "tcp://127.0.0.1:8786"])
    assert args.quick and args.questions == [1, 2, 6] and args.dataset == "fashion-mnist"
    assert (args.seeds, args.epochs, args.out, args.n_jobs) == (3, 4, "here", 2)
    assert args.scale == 2.5 and args.backend == "dask"
    assert args.scheduler == "tcp://127.0.0.1:8786"
    defaults = cli.study_parser().parse_args([])
    assert (defaults.dataset, defaults.out, defaults.n_jobs, defaults.quick) == (
        "digits", "study-out", -1, False)
    assert defaults.questions is None and defaults.architectures is None
    custom = cli.study_parser().parse_args(["--architectures", "c16-relu-mp2-fc64",
                                            "c16-bn-relu-mp2-fc64"])
    assert custom.architectures == ["c16-relu-mp2-fc64", "c16-bn-relu-mp2-fc64"]


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--epochs", "-1"], ["--scale", "0"],
                                  ["--scale", "inf"], ["--scale", "nan"],
                                  ["--backend", "spark"], ["--backend", "ray"],
                                  ["--n-jobs", "0"],
                                  ["--scheduler", "tcp://x:1"], ["--questions", "one"]])
def test_bad_study_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["study", *argv])
    assert exit_info.value.code == 2
    assert "usage: bnrs study" in capsys.readouterr().err


def test_study_is_dispatched_with_its_arguments(monkeypatch):
    seen = {}
    before = signal.getsignal(signal.SIGTERM)

    def run(**kwargs):
        seen.update(kwargs, sigterm=signal.getsignal(signal.SIGTERM))

    monkeypatch.setattr(runner, "run", run)
    assert cli.main(["study", "--quick", "--questions", "1", "6", "--n-jobs", "2",
                     "--out", "x"]) == 0
    # SIGTERM stops the study as Ctrl-C does, and only while it runs.
    assert seen.pop("sigterm") not in (before, signal.SIG_DFL)
    assert signal.getsignal(signal.SIGTERM) is before
    assert seen["quick"] and seen["questions"] == [1, 6] and seen["n_jobs"] == 2
    assert seen["out"] == "x" and seen["dataset"] == "digits" and not seen["report_only"]


def test_report_only_reuses_the_stored_arguments_and_refuses_others(monkeypatch, tmp_path,
                                                                     capsys):
    saved = ('{"questions": [2], "dataset": "fashion-mnist", "quick": false, "seeds": 3, '
             '"epochs": null, "scale": 1.0, "architectures": null}')
    (tmp_path / runner.STUDY_FILE).write_text(saved)
    seen = {}
    monkeypatch.setattr(runner, "run", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["study", "--report-only", "--out", str(tmp_path), "--no-progress"]) == 0
    assert seen["report_only"] and seen["dataset"] == "fashion-mnist"
    assert seen["questions"] == [2] and seen["seeds"] == 3
    # A study argument (even one equal to its default) would report another study, and
    # used to be saved as the study's: a later plain --report-only found none of its runs.
    seen.clear()
    for given in (["--seeds", "4"], ["--dataset", "digits"], ["--n-jobs", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["study", "--report-only", "--out", str(tmp_path), *given])
        assert exit_info.value.code == 2 and not seen
        assert f"it takes no {given[0]}" in capsys.readouterr().err
    assert (tmp_path / runner.STUDY_FILE).read_text() == saved


def test_report_only_after_a_study_reports_it_unchanged(tmp_path, capsys):
    study = ["study", "--questions", "3", "--quick", "--seeds", "2", "--epochs", "1",
             "--n-jobs", "1", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(study) == 0
    saved = (tmp_path / runner.STUDY_FILE).read_bytes()
    report = (tmp_path / "report.md").read_text()
    assert "4 of 4 distinct runs stored" in report
    with pytest.raises(SystemExit):
        cli.main(["study", "--report-only", "--seeds", "3", "--out", str(tmp_path)])
    assert cli.main(["study", "--report-only", "--no-progress", "--out", str(tmp_path)]) == 0
    assert (tmp_path / runner.STUDY_FILE).read_bytes() == saved
    assert "4 of 4 distinct runs stored" in (tmp_path / "report.md").read_text()


def test_report_only_without_a_study(tmp_path, capsys):
    assert cli.main(["study", "--report-only", "--out", str(tmp_path)]) == 2
    assert "no study here" in capsys.readouterr().err


def test_missing_dataset_explains_how_to_get_it(tmp_path, capsys):
    assert cli.main(["study", "--dataset", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_bench_is_dispatched_lazily(monkeypatch):
    seen = []
    fake = types.ModuleType("bnrs.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(__import__("sys").modules, "bnrs.bench", fake)
    monkeypatch.setattr(bnrs, "bench", fake, raising=False)
    assert cli.main(["bench", "--smoke", "--threads", "1"]) == 0
    assert seen == [["--smoke", "--threads", "1"]]


def test_usage_and_unknown_commands(capsys):
    assert cli.main([]) == 2
    assert "study" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0
    assert bnrs.__version__ in capsys.readouterr().out


# --------------------------------------------------------------------------- failures

QUICK = ["study", "--questions", "3", "--quick", "--seeds", "1", "--epochs", "1",
         "--n-jobs", "1", "--no-progress"]


def _fails_in_one_line(argv, capsys, *expected) -> str:
    """cli.main(argv) fails with a non-zero status and one line naming ``expected``."""
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status != 0, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("bnrs study: ")
    for text in expected:
        assert text in err, err
    return err


def test_a_text_file_as_results_database(tmp_path, capsys):
    (tmp_path / "results.sqlite").write_text("not a database\n" * 100)
    _fails_in_one_line(QUICK + ["--out", str(tmp_path)], capsys,
                       str(tmp_path / "results.sqlite"), "not an SQLite database")
    with pytest.raises(Exception, match="not an SQLite database"):   # --debug: traceback
        cli.main(QUICK + ["--out", str(tmp_path), "--debug"])


def test_a_foreign_sqlite_database_is_refused_untouched(tmp_path, capsys):
    path = tmp_path / "results.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE people (name TEXT, age INTEGER)")
    before = path.read_bytes()
    _fails_in_one_line(QUICK + ["--out", str(tmp_path)], capsys, str(path),
                       "not a bnrs results database", "people")
    assert path.read_bytes() == before
    path.unlink()
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE runs (run_key TEXT, score REAL)")
    _fails_in_one_line(QUICK + ["--out", str(tmp_path)], capsys, str(path),
                       "columns run_key, score")


def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    _fails_in_one_line(QUICK + ["--out", str(tmp_path / "taken")], capsys,
                       str(tmp_path / "taken"), "is a file, not a directory")
    _fails_in_one_line(QUICK + ["--out", str(tmp_path / "taken" / "below")], capsys,
                       str(tmp_path / "taken" / "below"), "cannot create")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes to read-only directories")
def test_read_only_out(tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        _fails_in_one_line(QUICK + ["--out", str(tmp_path / "o")], capsys,
                           str(tmp_path / "o"))
        _fails_in_one_line(QUICK + ["--out", str(tmp_path)], capsys, str(tmp_path))
    finally:
        tmp_path.chmod(0o755)


def test_unwritable_database(tmp_path, monkeypatch, capsys):
    # What SQLite says in a read-only directory (which root, running this test, is not in).
    def read_only(self, connection):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(storage.ResultStore, "_check_schema", read_only)
    _fails_in_one_line(QUICK + ["--out", str(tmp_path)], capsys,
                       str(tmp_path / "results.sqlite"), "cannot write", "writable")


def test_missing_dask_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dask.distributed", None)   # import fails
    _fails_in_one_line(QUICK + ["--backend", "dask", "--out", str(tmp_path)], capsys,
                       "--backend dask", 'pip install "bnrs[dask]"')


def test_dask_scheduler_without_workers_times_out(tmp_path, monkeypatch, capsys):
    distributed = pytest.importorskip("dask.distributed")
    monkeypatch.setattr(runner, "DASK_TIMEOUT", 2.0)
    with distributed.LocalCluster(n_workers=0, processes=False,
                                  dashboard_address=None) as cluster:
        _fails_in_one_line(QUICK + ["--backend", "dask", "--scheduler",
                                    cluster.scheduler_address, "--out", str(tmp_path)],
                           capsys, cluster.scheduler_address, "no dask worker joined")


def test_unreachable_dask_scheduler(tmp_path, monkeypatch, capsys):
    pytest.importorskip("dask.distributed")
    monkeypatch.setattr(runner, "DASK_TIMEOUT", 2.0)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{unused.getsockname()[1]}"
    _fails_in_one_line(QUICK + ["--backend", "dask", "--scheduler", address, "--out",
                                str(tmp_path)], capsys, address, "cannot reach")


def test_help_counts_every_question(capsys):
    from bnrs.study.questions import QUESTIONS

    assert cli.N_QUESTIONS == len(QUESTIONS) == 13
    with pytest.raises(SystemExit):
        cli.main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "1-10" not in text and "all 13 questions" in text and "1-13" in text


def test_report_only_on_a_broken_study_file_or_without_runs(tmp_path, capsys):
    (tmp_path / runner.STUDY_FILE).write_text("{not json")
    _fails_in_one_line(["study", "--report-only", "--out", str(tmp_path)], capsys,
                       str(tmp_path / runner.STUDY_FILE), "not a study file")
    (tmp_path / runner.STUDY_FILE).write_text('{"questions": [1], "quick": true}')
    _fails_in_one_line(["study", "--report-only", "--out", str(tmp_path)], capsys,
                       str(tmp_path / "results.sqlite"), "no stored runs")
    assert not (tmp_path / "results.sqlite").exists()
