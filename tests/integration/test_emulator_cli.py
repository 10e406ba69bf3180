"""``dbsync emulator`` as a process: it starts fast, answers, and stops cleanly on a signal."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from dbsync.cli import main

REPOSITORY = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start(*flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dbsync", "emulator", *flags],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_emulator_process_starts_answers_and_stops_on_a_signal(signum: int) -> None:
    port = free_port()
    process = start("--port", str(port))
    try:
        assert process.stdout is not None
        listening = json.loads(process.stdout.readline())  # waits for the line, no polling
        assert listening["event"] == "emulator_listening"
        assert listening["url"] == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{listening['url']}/_emulator/stats", timeout=10) as answer:
            stats = json.load(answer)
        assert stats["accounts"] == 10_000

        process.send_signal(signum)
        assert process.wait(timeout=10) == 0
        assert json.loads(process.stdout.readline())["event"] == "emulator_stopped"
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_a_port_in_use_exits_1_with_an_event() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = start("--port", str(taken.getsockname()[1]))
        stdout, _ = process.communicate(timeout=30)
    assert process.returncode == 1
    assert json.loads(stdout.splitlines()[-1])["event"] == "emulator_bind_failed"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--drop-ratio", "1.5"], "--drop-ratio"),
        (["--accounts", "-3"], "--accounts"),
        (["--day-seconds", "0"], "--day-seconds"),
        (["--token", ""], "--token"),
        (["--error-status", "404"], "--error-status"),
        (["--quota", "export.create_job=many"], "--quota"),
        (["--quota", "export.teleport=3"], "--quota"),
        (["--port", "70000"], "--port"),
        (["--seed", "abc"], "--seed"),
    ],
)
def test_invalid_flag_values_exit_2_naming_the_flag(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["emulator", *flags])
    except SystemExit as exit_:  # argparse's own type checks
        code = exit_.code
    assert code == 2
    assert f"argument {named}:" in capsys.readouterr().err
