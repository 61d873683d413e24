"""`sdturbo serve`: flags -> settings, bad flags -> exit code 2, and the real command serving the tiny model."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

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
    "argv, field",
    [
        (["--max-batch", "0"], "max_batch"),
        (["--port", "70000"], "port"),
        (["--api-key", "short"], "api_key"),
        (["--vae-dtype", "fp16"], "vae_dtype"),
    ],
)
def test_bad_flags_exit_2_before_loading_a_model(argv, field, capsys):
    assert serve_main(parse(*argv)) == 2
    assert field in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




@pytest.mark.slow
def test_sdturbo_serve_command_serves_the_tiny_model(tiny_model_dir):
    port = free_port()
    argv = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32", "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdturbo", "serve", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
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
    assert "max_side_px 256 is below default_side_px 512" in capsys.readouterr().err
