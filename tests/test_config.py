"""Configuration (API.md, "Configuration"): the original variable names, the
URL forms, .env files, and chatd refusing to start with one line on stderr."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from chatd import config

BASE = {"DATABASE_URL": "postgresql://u@db:5432/chat", "ACCESS_TOKEN_SECRET": "s3cret"}


def load(env: dict, **kw) -> config.Settings:
    return config.load(env, use_dotenv=False, **kw)


def test_defaults():
    s = load(BASE)
    assert s.port == 8080
    assert s.redis_url is None
    assert s.cors_origins == ()
    assert s.jwt_user_claims == ("sub", "id", "userId")
    assert s.max_message_length == 4000
    assert s.rate_limit_sends == (30, 10.0)
    assert s.log_format == "text"


def test_missing_access_token_secret_is_refused_naming_it():
    with pytest.raises(config.ConfigError, match="ACCESS_TOKEN_SECRET"):
        load({"DATABASE_URL": BASE["DATABASE_URL"]})
    with pytest.raises(config.ConfigError, match="ACCESS_TOKEN_SECRET"):
        load({**BASE, "ACCESS_TOKEN_SECRET": "   "})


@pytest.mark.parametrize("raw", ["abc", "80.5", "-1", "65536", "8080x"])
def test_malformed_chatport_is_refused_naming_it(raw):
    with pytest.raises(config.ConfigError, match="CHATPORT"):
        load({**BASE, "CHATPORT": raw})


def test_chatport_is_read():
    assert load({**BASE, "CHATPORT": " 9001 "}).port == 9001


@pytest.mark.parametrize("url", ["mysql://u@h/db", "http://h/db", "h:5432/db", "sqlite:///x"])
def test_database_url_with_a_wrong_scheme_is_refused(url):
    with pytest.raises(config.ConfigError, match="DATABASE_URL"):
        load({**BASE, "DATABASE_URL": url})


def test_redis_url_with_a_wrong_scheme_is_refused():
    with pytest.raises(config.ConfigError, match="REDIS_URL"):
        load({**BASE, "REDIS_URL": "http://localhost:6379"})


def test_redis_cluster_nodes_are_read_in_place_of_redis_url():
    s = load({**BASE, "REDIS_CLUSTER_NODES": " 10.0.0.1:7000, redis-b:7001 ,"})
    assert s.redis_url == "redis+cluster://10.0.0.1:7000,redis-b:7001"
    assert config.cluster_nodes(s.redis_url) == [("10.0.0.1", 7000), ("redis-b", 7001)]
    assert config.cluster_nodes("redis://localhost:6379/0") is None
    # Workers only need some Redis: a cluster is one.
    assert load({**BASE, "REDIS_CLUSTER_NODES": "h:7000", "CHATD_WORKERS": "2"}).workers == 2


@pytest.mark.parametrize("raw", ["h", "h:", ":7000", "h:70000", "h:x", ","])
def test_malformed_redis_cluster_nodes_are_refused_naming_it(raw):
    with pytest.raises(config.ConfigError, match="REDIS_CLUSTER_NODES"):
        load({**BASE, "REDIS_CLUSTER_NODES": raw})


def test_redis_cluster_nodes_and_redis_url_together_are_refused():
    with pytest.raises(config.ConfigError, match="REDIS_CLUSTER_NODES"):
        load({**BASE, "REDIS_CLUSTER_NODES": "h:7000", "REDIS_URL": "redis://r:6379/0"})


def test_db_parts_are_assembled_into_a_url_with_quoting():
    s = load(
        {
            "ACCESS_TOKEN_SECRET": "x",
            "DB_HOST": "db.internal",
            "DB_PORT": "6543",
            "DB_USER": "chat user",
            "DB_PASSWORD": "p@ss:w/rd",
            "DB_NAME": "chatdb",
        }
    )
    assert s.database_url == "postgresql://chat%20user:p%40ss%3Aw%2Frd@db.internal:6543/chatdb"
    assert "p@ss" not in str(s.redacted())


def test_db_port_defaults_and_must_be_a_port():
    env = {"ACCESS_TOKEN_SECRET": "x", "DB_HOST": "h", "DB_NAME": "n"}
    assert load(env).database_url == "postgresql://h:5432/n"
    with pytest.raises(config.ConfigError, match="DB_PORT"):
        load({**env, "DB_PORT": "five"})
    with pytest.raises(config.ConfigError, match="DB_NAME"):
        load({"ACCESS_TOKEN_SECRET": "x", "DB_HOST": "h"})


def test_database_url_wins_over_the_parts():
    s = load({**BASE, "DB_HOST": "other", "DB_NAME": "other"})
    assert s.database_url == BASE["DATABASE_URL"]


def test_redis_parts_are_assembled_and_redis_url_wins():
    s = load({**BASE, "REDIS_HOST": "cache", "REDIS_PORT": "6380", "REDIS_PASSWORD": "a b"})
    assert s.redis_url == "redis://:a%20b@cache:6380/0"
    s = load({**BASE, "REDIS_HOST": "cache", "REDIS_URL": "redis://r:1/2"})
    assert s.redis_url == "redis://r:1/2"


def test_original_names_and_extras_are_read():
    s = load(
        {
            **BASE,
            "FRONTENDADDRES": "https://a.example, https://b.example",
            "REFRESH_TOKEN_SECRET": "r",
            "JWT_USER_CLAIMS": "uid,sub",
            "JWT_AUDIENCE": "chat",
            "JWT_ISSUER": "auth",
            "MAX_MESSAGE_LENGTH": "100",
            "RATE_LIMIT_SENDS": "5/1m",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "JSON",
        }
    )
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.jwt_user_claims == ("uid", "sub")
    assert (s.jwt_audience, s.jwt_issuer) == ("chat", "auth")
    assert s.max_message_length == 100
    assert s.rate_limit_sends == (5, 60.0)
    assert (s.log_level, s.log_format) == ("DEBUG", "json")


@pytest.mark.parametrize(
    "name,raw",
    [
        ("MAX_MESSAGE_LENGTH", "0"),
        ("MAX_MESSAGE_LENGTH", "lots"),
        ("RATE_LIMIT_SENDS", "fast"),
        ("RATE_LIMIT_SENDS", "0/10s"),
        ("LOG_LEVEL", "loud"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_malformed_settings_name_the_variable(name, raw):
    with pytest.raises(config.ConfigError, match=name):
        load({**BASE, name: raw})


def test_tls_files_must_come_in_pairs_and_exist(tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("k")
    with pytest.raises(config.ConfigError, match="TLS_KEY_FILE"):
        load({**BASE, "TLS_CERT_FILE": str(key)})
    with pytest.raises(config.ConfigError, match="TLS_CERT_FILE"):
        load({**BASE, "TLS_CERT_FILE": "/nonexistent/cert.pem", "TLS_KEY_FILE": str(key)})


def test_env_file_is_read_and_the_environment_wins(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text(
        "ACCESS_TOKEN_SECRET=from-file\n"
        "CHATPORT=7000\n"
        "DB_HOST=filehost\nDB_NAME=filedb\n"
        "# a comment\nMAX_MESSAGE_LENGTH=123\n"
    )
    s = config.load({"CHATPORT": "7001"}, env_file=env_file)
    assert s.access_token_secret == "from-file"
    assert s.port == 7001
    assert s.database_url == "postgresql://filehost:5432/filedb"
    assert s.max_message_length == 123
    # .env in the working directory is found by default.
    monkeypatch.chdir(tmp_path)
    assert config.load({}).port == 7000
    # A named file that does not exist is an error.
    with pytest.raises(config.ConfigError, match="env file"):
        config.load({}, env_file=tmp_path / "missing.env")


def _run_chatd(env: dict, cwd) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("DB_", "REDIS_", "CHAT", "DATABASE_", "ACCESS_"))}  # fmt: skip
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-m", "chatd"],
        env=clean,
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "env,name",
    [
        ({**BASE, "CHATPORT": "eighty"}, "CHATPORT"),
        ({"DATABASE_URL": BASE["DATABASE_URL"]}, "ACCESS_TOKEN_SECRET"),
        ({**BASE, "DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({**BASE, "MAX_MESSAGE_LENGTH": "-3"}, "MAX_MESSAGE_LENGTH"),
    ],
)
def test_chatd_with_a_malformed_setting_exits_2_with_one_line_naming_it(tmp_path, env, name):
    result = _run_chatd(env, tmp_path)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.slow
def test_chatd_reads_a_malformed_setting_from_dotenv_too(tmp_path):
    (tmp_path / ".env").write_text(f"DATABASE_URL={BASE['DATABASE_URL']}\nCHATPORT=x\n")
    result = _run_chatd({"ACCESS_TOKEN_SECRET": "s"}, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CHATPORT" in lines[0]
