"""Serving auth is settled before anything binds or deploys: a token or a loopback host, never
silently neither (no Ray needed: building the app only describes deployments)."""

from __future__ import annotations

import pytest

from busdiff.config import ConfigError, load_config
from busdiff.serving.app import build_app


@pytest.fixture(autouse=True)
def no_token_env(monkeypatch):
    monkeypatch.delenv("BUSDIFF_SERVE_TOKEN", raising=False)


def test_an_empty_token_file_is_refused_not_taken_as_auth_off(tmp_path):
    token = tmp_path / "token"
    token.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        build_app(load_config(None, [f"serve.auth_token_file={token}"]))


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_a_reachable_http_host_without_token_is_refused(host, monkeypatch):
    monkeypatch.setenv("BUSDIFF_SERVE_TOKEN", "   ")  # blank: no token
    with pytest.raises(ConfigError, match=f"'{host}' is reachable"):
        build_app(load_config(None, []), http_host=host)  # the host Serve listens on, not serve.host


def test_loopback_or_a_token_or_an_explicit_opt_out_is_served(tmp_path):
    build_app(load_config(None, []), http_host="127.0.0.1")
    build_app(load_config(None, ["serve.allow_unauthenticated_remote=true"]), http_host="0.0.0.0")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    build_app(load_config(None, [f"serve.auth_token_file={token}"]), http_host="0.0.0.0")
