"""chatctl token: mint an access token (for trying the API, and for tests)."""

from __future__ import annotations

import click

from chatd import embedded, validate
from chatd.errors import BadRequest

from .context import Ctx, pass_ctx


@click.command()
@click.argument("user")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime: 30s, 15m, 1h, 7d.")
@click.option("--claim", "claims", multiple=True, metavar="K=V", help="Extra claim (repeatable).")
@pass_ctx
def token(obj: Ctx, user: str, ttl: str, claims: tuple[str, ...]) -> None:
    """Mint an access token for USER with the configured ACCESS_TOKEN_SECRET.

    JWT_AUDIENCE and JWT_ISSUER, when configured, are added as aud and iss.

    \b
    Example:
      curl -H "Authorization: Bearer $(chatctl token alice)" localhost:8080/chats
      chatctl token bob --ttl 15m --claim role=tester
    """
    from chatd.auth import mint

    try:
        validate.user_id(user, "USER")
    except BadRequest as exc:
        raise click.BadParameter(exc.message, param_hint="USER") from None
    seconds = duration(ttl)
    extra = {}
    for item in claims:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not K=V", param_hint="--claim")
        extra[key] = value
    secret = obj.settings.access_token_secret
    if not secret:
        raise click.UsageError(
            "ACCESS_TOKEN_SECRET is not set, and there is no embedded chatd secret in "
            f"{embedded.data_dir_of(obj.settings)} (start chatd once, or set CHATD_DATA_DIR)"
        )
    if obj.settings.jwt_audience and "aud" not in extra:
        extra["aud"] = obj.settings.jwt_audience
    if obj.settings.jwt_issuer and "iss" not in extra:
        extra["iss"] = obj.settings.jwt_issuer
    click.echo(mint(secret, user, seconds, extra))


def duration(text: str) -> float:
    """``30s``, ``15m``, ``1h``, ``7d`` (or plain seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit.isdigit():
        number, unit = text, "s"
    if not number.isdigit() or unit not in units or int(number) <= 0:
        raise click.BadParameter(
            f"{text!r} is not a duration like 30s, 15m, 1h or 7d", param_hint="--ttl"
        )
    return int(number) * units[unit]
