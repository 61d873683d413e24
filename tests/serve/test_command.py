"""`sdturbo serve`: flags -> settings, bad flags -> exit code 2, and the real command serving the tiny model."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sdturbo.serve import add_serve_arguments, serve_main
from sdturbo.serve.command import settings_from_args


def parse(*argv: str) -> argparse.Namespace:
    return add_serve_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_flags_become_settings_and_safe_defaults_stay():
    s = settings_from_args(
        parse(
            "--port",
            "9001",
            "--max-batch",
            "4",
            "--allow-origin",
            "http://a.example",
            "http://b.example",
            "--timeout",
            "5",
        )
    )
    assert (s.port, s.max_batch, s.request_timeout_s) == (9001, 4, 5.0)
    assert s.allow_origins == ["http://a.example", "http://b.example"]
    assert s.host == "127.0.0.1" and s.api_key is None and s.allowed_hosts == []
    assert s.vae_dtype == "auto" and settings_from_args(parse("--vae-dtype", "fp32")).vae_dtype == "fp32"
    assert s.fast and not s.compile
    plain = settings_from_args(parse("--no-fast"))
    assert not plain.fast and settings_from_args(parse("--compile")).compile


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("SDTURBO_API_KEY", "from-the-environment")
    assert settings_from_args(parse()).api_key.get_secret_value() == "from-the-environment"
    assert settings_from_args(parse("--api-key", "from-the-flag!")).api_key.get_secret_value() == "from-the-flag!"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-batch", "0"], "error: --max-batch: must be greater than or equal to 1"),
        (["--port", "70000"], "error: --port: must be less than or equal to 65535"),
        (["--api-key", "short"], "error: --api-key: must be at least 8 characters"),
        (["--vae-dtype", "fp16"], "error: --vae-dtype: must be 'auto', 'fp32' or 'bf16'"),
        (["--timeout", "-5"], "error: --timeout: must be greater than 0"),
        (["--max-side", "100"], "error: --max-side: must be a multiple of 8"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag_before_loading_a_model(argv, message, capsys):
    assert serve_main(parse(*argv)) == 2
    assert capsys.readouterr().err.startswith(message)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("SDTURBO_API_KEY", "sekrit", "SDTURBO_API_KEY: must be at least 8 characters"),
        ("SDTURBO_MAX_SIDE", "100", "SDTURBO_MAX_SIDE: must be a multiple of 8"),
        ("SDTURBO_MAX_SIDE_PX", "100", "SDTURBO_MAX_SIDE_PX: must be a multiple of 8"),
        ("SDTURBO_TIMEOUT", "0", "SDTURBO_TIMEOUT: must be greater than 0"),
        ("SDTURBO_ALLOW_ORIGIN", '["unclosed', "SDTURBO_ALLOW_ORIGIN: give the values separated by spaces"),
    ],
)
def test_bad_environment_values_exit_2_naming_the_variable(monkeypatch, capsys, name, value, message):
    monkeypatch.setenv(name, value)
    assert serve_main(parse()) == 2
    assert capsys.readouterr().err.startswith("error: " + message)


def test_the_environment_names_follow_the_flags_and_the_old_names_still_work(monkeypatch):
    monkeypatch.setenv("SDTURBO_MAX_SIDE", "768")
    monkeypatch.setenv("SDTURBO_TIMEOUT", "5")
    monkeypatch.setenv("SDTURBO_ALLOW_ORIGIN", "http://a.example http://b.example")
    monkeypatch.setenv("SDTURBO_ALLOWED_HOSTS", '["images.internal"]')  # the field's name, as documented before
    s = settings_from_args(parse())
    assert (s.max_side_px, s.request_timeout_s, s.allowed_hosts) == (768, 5.0, ["images.internal"])
    assert s.allow_origins == ["http://a.example", "http://b.example"]
    assert settings_from_args(parse("--max-side", "512")).max_side_px == 512  # the command line wins


def test_unknown_sdturbo_variables_are_warned_about(monkeypatch, capsys):
    monkeypatch.setenv("SDTURBO_MAXSIDE", "768")
    monkeypatch.setenv("SDTURBO_PORT", "9000")
    assert serve_main(parse("--port", "70000")) == 2
    err = capsys.readouterr().err
    assert "warning: SDTURBO_MAXSIDE is not a setting of sdturbo serve" in err and "SDTURBO_PORT" not in err


def test_the_help_lists_the_environment_variables():
    help_text = add_serve_arguments(argparse.ArgumentParser()).format_help()
    assert "SDTURBO_MAX_SIDE=768" in help_text and "SDTURBO_DEFAULT_SIDE_PX" in help_text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_busy_port_or_an_unknown_host_exits_2_before_loading_a_model(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # No such model: reaching the loading step would fail differently.
        assert serve_main(parse("--model", "/nonexistent", "--port", str(port))) == 2
    assert capsys.readouterr().err == (
        f"error: --port {port}: already in use on 127.0.0.1; stop the program using it or choose another port\n"
    )
    assert serve_main(parse("--model", "/nonexistent", "--host", "999.1.1.1")) == 2
    assert capsys.readouterr().err.startswith("error: --host 999.1.1.1: unknown host")


def wait_until_serving(proc: subprocess.Popen, port: int, timeout_s: float) -> str:
    """The server's URL once /healthz answers; fails the test if the process ends or the time runs out first."""
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.1)


@pytest.mark.slow
def test_sdturbo_serve_command_serves_the_tiny_model(tiny_model_dir):
    port = free_port()
    argv = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32", "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdturbo", "serve", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = wait_until_serving(proc, port, timeout_s=120)
        body = {"prompt": "from the command line", "size": "64x64", "seed": 1}
        r = httpx.post(url + "/v1/images/generations", json=body, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_requests_without_a_size_get_the_model_s_own_unless_the_operator_chose(monkeypatch):
    from sdturbo.serve.command import with_model_default_size

    assert with_model_default_size(settings_from_args(parse()), 64).default_side_px == 64  # sdturbo-mini
    assert with_model_default_size(settings_from_args(parse()), 512).default_side_px == 512
    assert with_model_default_size(settings_from_args(parse("--max-side", "128")), 64).default_side_px == 64
    with pytest.raises(ValueError, match="--max-side 256 is below this model's size 512"):
        with_model_default_size(settings_from_args(parse("--max-side", "256")), 512)
    monkeypatch.setenv("SDTURBO_DEFAULT_SIDE_PX", "256")
    assert with_model_default_size(settings_from_args(parse()), 64).default_side_px == 256


def test_a_chosen_default_size_must_fit_under_max_side(monkeypatch, capsys):
    monkeypatch.setenv("SDTURBO_DEFAULT_SIDE_PX", "512")
    assert serve_main(parse("--max-side", "256")) == 2
    assert "error: --max-side 256 is below SDTURBO_DEFAULT_SIDE_PX 512" in capsys.readouterr().err


def test_compile_runs_the_default_size_before_serving(capsys):
    from sdturbo.serve.command import compile_default_size, with_model_default_size

    calls = []
    settings = with_model_default_size(settings_from_args(parse("--compile")), 64)
    compile_default_size(lambda prompt, **kw: calls.append(kw), settings)
    assert calls == [{"height": 64, "width": 64, "seed": 0, "output_type": "pil"}]
    assert "compiling for 64x64" in capsys.readouterr().err


SLOW_SERVER = """
import sys
sys.path.insert(0, {tests!r})
from fake_pipeline import FakePipeline
from sdturbo.pipeline import TurboPipeline
pipe = FakePipeline(delay_s=60)
pipe.native_side_px = 64
TurboPipeline.from_pretrained = staticmethod(lambda *a, **k: pipe)
from sdturbo.cli import main
sys.exit(main(["serve", "--model", "fake", "--no-fast", "--port", sys.argv[1]]))
"""


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_stopping_mid_generation_answers_503_and_exits_without_waiting_for_the_model(signal_name):
    """Ctrl+C or SIGTERM while a (60 s) image is being made: the open request gets a JSON 503 at once and the
    process ends in seconds, not when the model thread's call returns."""
    import signal
    from pathlib import Path

    port = free_port()
    script = SLOW_SERVER.format(tests=str(Path(__file__).parent))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = wait_until_serving(proc, port, timeout_s=60)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/v1/images/generations", json={"prompt": "slow"}, timeout=30)
            time.sleep(1.0)  # the request is in the model thread now
            started = time.monotonic()
            proc.send_signal(getattr(signal, signal_name))
            response = pending.result()
        assert response.status_code == 503
        assert response.json()["error"]["message"] == "the server is shutting down; retry when it is back"
        code = proc.wait(timeout=15)
        assert time.monotonic() - started < 15
        assert code == (130 if signal_name == "SIGINT" else -signal.SIGTERM)
    finally:
        proc.kill()
        proc.wait()
