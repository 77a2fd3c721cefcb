"""Configuration: the environment, then a ``.env`` file, then a default.

Every variable of the original Node service keeps its name (API.md,
"Configuration"); the extras are listed in ``.env.example``. A missing or
malformed setting raises :class:`ConfigError` whose message is one line naming
the variable, which ``chatd`` prints before exiting with status 2.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from dotenv import dotenv_values


def _search_language(raw: str | None) -> str:
    """SEARCH_LANGUAGE's shape (a configuration name such as simple, english
    or pg_catalog.german); whether PostgreSQL has it is checked at start-up."""
    if raw is None:
        return "simple"
    name = raw.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?", name):
        raise ConfigError(f"SEARCH_LANGUAGE must name a text search configuration, got {raw!r}")
    return name


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    access_token_secret: str
    database_url: str | None  # None: no database configured (the embedded default)
    redis_url: str | None  # None: run without Redis (single process, no page cache)
    port: int = 8080
    host: str = ""
    cors_origins: tuple[str, ...] = ()
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    jwt_user_claims: tuple[str, ...] = ("sub", "id", "userId")
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    max_message_length: int = 4000
    # The PostgreSQL text search configuration of GET /search (SEARCH_LANGUAGE).
    search_language: str = "simple"
    rate_limit_sends: tuple[int, float] | None = (30, 10.0)  # None: off
    rate_limit_events: tuple[int, float] | None = (120, 10.0)
    log_level: str = "INFO"
    log_format: str = "text"
    data_dir: str | None = None
    embedded_user: str = "chatd"  # as root, the embedded PostgreSQL runs as this user
    db_pool_size: int = 20
    db_timeout: float = 5.0
    redis_timeout: float = 1.0
    redis_prefix: str = "chatd"
    socketio_channel: str = "chatd-socketio"
    presence_ttl: float = 20.0
    cache_rows: int = 100
    cache_ttl: int = 3600
    shutdown_timeout: float = 10.0
    body_timeout: float = 20.0
    ws_compression: bool = False
    workers: int = 1
    console: bool = True  # the web console at / (CHATD_CONSOLE=off: not served)
    # True only on the embedded default with the secret chatd generated itself
    # (no ACCESS_TOKEN_SECRET configured): the console may then mint tokens
    # ("sign in as NAME", chatd/webconsole.py). Set by server.main, never by env.
    own_secret: bool = False
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

    def redacted(self) -> dict:
        """The settings with secrets and passwords masked, for logs and `chatctl check`."""
        out = {}
        for name in self.__dataclass_fields__:
            if name == "extra":
                continue
            value = getattr(self, name)
            if name == "access_token_secret":
                value = "***" if value else ""
            elif name in ("database_url", "redis_url") and value:
                value = _mask_url(value)
            out[name] = value
        return out


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_rate(name: str, raw: str) -> tuple[int, float]:
    """``30/10s`` -> (30, 10.0); ``5/s`` -> (5, 1.0); ``100/1m`` -> (100, 60.0)."""
    m = _RATE_RE.match(raw)
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"{name} must look like 30/10s (count/period), got {raw!r}")
    period = float(m.group(2) or 1) * _UNITS[m.group(3)]
    if period <= 0:
        raise ConfigError(f"{name} must have a period above zero, got {raw!r}")
    return int(m.group(1)), period


def _rate_or_off(name: str, raw: str) -> tuple[int, float] | None:
    """``off`` turns a limit off (benchmarks against a service that has none)."""
    if raw.strip().lower() == "off":
        return None
    return parse_rate(name, raw)


class _Env:
    """Lookup in the environment first, then the .env file; blank counts as unset."""

    def __init__(self, environ: dict, dotenv: dict):
        self.environ = environ
        self.dotenv = dotenv

    def get(self, name: str) -> str | None:
        for source in (self.environ, self.dotenv):
            value = source.get(name)
            if value is not None and value.strip() != "":
                return value.strip()
        return None

    def int(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    def float(self, name: str, default: float, lo: float, hi: float) -> float:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        raw = self.get(name)
        if raw is None:
            return default
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.get(name)
        if raw is None:
            return default
        if raw.lower() not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw.lower()

    def csv(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        raw = self.get(name)
        if raw is None:
            return default
        return tuple(p.strip() for p in raw.split(",") if p.strip())


def _database_url(env: _Env) -> str | None:
    url = env.get("DATABASE_URL")
    if url is not None:
        scheme = urlsplit(url).scheme
        if scheme not in ("postgres", "postgresql"):
            raise ConfigError(f"DATABASE_URL must be a postgresql:// URL, got scheme {scheme!r}")
        return url
    host = env.get("DB_HOST")
    if host is None:
        return None
    port = env.int("DB_PORT", 5432, 1, 65535)
    user = env.get("DB_USER")
    password = env.get("DB_PASSWORD")
    name = env.get("DB_NAME")
    if name is None:
        raise ConfigError("DB_NAME is required when DB_HOST is set")
    auth = ""
    if user:
        auth = quote(user, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        auth += "@"
    return f"postgresql://{auth}{quote(host, safe='')}:{port}/{quote(name, safe='')}"


CLUSTER_SCHEME = "redis+cluster"


def cluster_nodes(url: str | None) -> list[tuple[str, int]] | None:
    """The seed nodes of a ``redis+cluster://host:port,host:port`` URL (what
    REDIS_CLUSTER_NODES becomes), or None for any other URL."""
    if not url or not url.startswith(CLUSTER_SCHEME + "://"):
        return None
    nodes = []
    for part in url[len(CLUSTER_SCHEME) + 3 :].split(","):
        host, _, port = part.rpartition(":")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def _cluster_url(raw: str) -> str:
    nodes = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"REDIS_CLUSTER_NODES must be host:port[,host:port...], got {part!r}")
        nodes.append(f"{host}:{int(port)}")
    if not nodes:
        raise ConfigError("REDIS_CLUSTER_NODES must name at least one host:port")
    return f"{CLUSTER_SCHEME}://{','.join(nodes)}"


def _redis_url(env: _Env) -> str | None:
    cluster = env.get("REDIS_CLUSTER_NODES")
    if cluster:
        if env.get("REDIS_URL") or env.get("REDIS_HOST"):
            raise ConfigError("set either REDIS_CLUSTER_NODES or REDIS_URL/REDIS_HOST, not both")
        return _cluster_url(cluster)
    url = env.get("REDIS_URL")
    if url is not None:
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"REDIS_URL must be a redis:// URL, got scheme {scheme!r}")
        return url
    host = env.get("REDIS_HOST")
    if host is None:
        return None
    port = env.int("REDIS_PORT", 6379, 1, 65535)
    password = env.get("REDIS_PASSWORD")
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/0"


_ORIGIN_RE = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<host>[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>\d{1,5}))?$"
)
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def parse_origins(raw: str | None) -> tuple[str, ...]:
    """FRONTENDADDRES: comma-separated origins, each ``scheme://host[:port]``
    exactly as a browser sends it in ``Origin`` (no path, no trailing slash),
    or ``*``. An entry that could never match a browser's Origin is an error
    rather than a silent refusal of that frontend."""
    if raw is None:
        return ()
    out = []
    for entry in (p.strip() for p in raw.split(",")):
        if not entry:
            continue
        if entry == "*":
            out.append(entry)
            continue
        m = _ORIGIN_RE.match(entry)
        if m is None:
            hint = ""
            if "://" not in entry:
                hint = f" (with its scheme: http://{entry}?)"
            elif entry.endswith("/"):
                hint = f" (without the trailing slash: {entry.rstrip('/')}?)"
            raise ConfigError(
                f"FRONTENDADDRES entry {entry!r} is not an origin: each must be "
                f"scheme://host[:port] as a browser sends it, or *{hint}"
            )
        scheme, host, port = m.group("scheme").lower(), m.group("host").lower(), m.group("port")
        if port is not None and not 1 <= int(port) <= 65535:
            raise ConfigError(f"FRONTENDADDRES entry {entry!r} has a port out of range")
        if port is None or _DEFAULT_PORTS.get(scheme) == port:
            origin = f"{scheme}://{host}"  # a browser leaves the default port out
        else:
            origin = f"{scheme}://{host}:{port}"
        if origin not in out:
            out.append(origin)
    return tuple(out)


def database_name(url: str | None) -> str:
    if not url:
        return "embedded"
    path = urlsplit(url).path.lstrip("/")
    return path or "postgres"


def load(
    environ: dict | None = None,
    env_file: str | os.PathLike | None = None,
    use_dotenv: bool = True,
) -> Settings:
    """Read the settings. ``env_file`` defaults to ``.env`` in the working directory
    (or ``CHATD_ENV_FILE``); a missing default file is fine, a missing named one is not.
    ``use_dotenv=False`` reads ``environ`` alone (tests)."""
    environ = dict(os.environ if environ is None else environ)
    path = env_file or environ.get("CHATD_ENV_FILE")
    dotenv: dict = {}
    if not use_dotenv:
        pass
    elif path:
        if not Path(path).is_file():
            raise ConfigError(f"env file {str(path)!r} does not exist")
        dotenv = dotenv_values(path)
    elif Path(".env").is_file():
        dotenv = dotenv_values(".env")
    env = _Env(environ, {k: v for k, v in dotenv.items() if v is not None})

    database_url = _database_url(env)
    redis_url = _redis_url(env)
    secret = env.get("ACCESS_TOKEN_SECRET") or ""
    if not secret and database_url is not None:
        raise ConfigError(
            "ACCESS_TOKEN_SECRET is required (the secret the auth service signs with)"
        )

    claims = env.csv("JWT_USER_CLAIMS", ("sub", "id", "userId"))
    if not claims:
        raise ConfigError("JWT_USER_CLAIMS must name at least one claim")

    tls_cert, tls_key = env.get("TLS_CERT_FILE"), env.get("TLS_KEY_FILE")
    if bool(tls_cert) != bool(tls_key):
        missing = "TLS_KEY_FILE" if tls_cert else "TLS_CERT_FILE"
        raise ConfigError(f"{missing} is required when the other TLS file is set")
    for name, value in (("TLS_CERT_FILE", tls_cert), ("TLS_KEY_FILE", tls_key)):
        if value and not Path(value).is_file():
            raise ConfigError(f"{name} {value!r} is not a readable file")

    rate_raw = env.get("RATE_LIMIT_SENDS")
    rate = _rate_or_off("RATE_LIMIT_SENDS", rate_raw) if rate_raw else (30, 10.0)
    events_raw = env.get("RATE_LIMIT_EVENTS")
    events_rate = _rate_or_off("RATE_LIMIT_EVENTS", events_raw) if events_raw else (120, 10.0)

    level = (env.get("LOG_LEVEL") or "info").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL must be debug, info, warning or error, got {level.lower()!r}")

    workers = env.int("CHATD_WORKERS", 1, 0, 256) or (os.cpu_count() or 1)
    if workers > 1 and redis_url is None:
        raise ConfigError("CHATD_WORKERS above 1 needs Redis (REDIS_URL) to join the workers")

    prefix = env.get("CHATD_REDIS_PREFIX") or f"chatd:{database_name(database_url)}"
    return Settings(
        access_token_secret=secret,
        database_url=database_url,
        redis_url=redis_url,
        port=env.int("CHATPORT", 8080, 0, 65535),
        host=env.get("CHATD_HOST") or "",
        cors_origins=parse_origins(env.get("FRONTENDADDRES")),
        tls_cert_file=tls_cert,
        tls_key_file=tls_key,
        jwt_user_claims=claims,
        jwt_audience=env.get("JWT_AUDIENCE"),
        jwt_issuer=env.get("JWT_ISSUER"),
        max_message_length=env.int("MAX_MESSAGE_LENGTH", 4000, 1, 60000),
        search_language=_search_language(env.get("SEARCH_LANGUAGE")),
        rate_limit_sends=rate,
        rate_limit_events=events_rate,
        log_level=level,
        log_format=env.choice("LOG_FORMAT", "text", ("text", "json")),
        data_dir=env.get("CHATD_DATA_DIR"),
        embedded_user=env.get("CHATD_EMBEDDED_USER") or "chatd",
        db_pool_size=env.int("DB_POOL_SIZE", 20, 1, 1000),
        db_timeout=env.float("DB_TIMEOUT", 5.0, 0.1, 600.0),
        redis_timeout=env.float("REDIS_TIMEOUT", 1.0, 0.05, 60.0),
        redis_prefix=prefix,
        socketio_channel=env.get("SOCKETIO_CHANNEL") or "chatd-socketio",
        presence_ttl=env.float("PRESENCE_TTL", 20.0, 1.0, 3600.0),
        cache_rows=env.int("CACHE_ROWS", 100, 0, 1000),
        cache_ttl=env.int("CACHE_TTL", 3600, 1, 30 * 86400),
        shutdown_timeout=env.float("SHUTDOWN_TIMEOUT", 10.0, 0.0, 3600.0),
        body_timeout=env.float("BODY_TIMEOUT", 20.0, 0.1, 600.0),
        ws_compression=env.bool("WS_COMPRESSION", False),
        workers=workers,
        console=env.bool("CHATD_CONSOLE", True),
        extra={"refresh_token_secret_set": env.get("REFRESH_TOKEN_SECRET") is not None},
    )
