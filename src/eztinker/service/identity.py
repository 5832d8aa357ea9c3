"""The caller's identity as the Tinker SDK asks for it: short-lived JWTs exchanged for an API key
(`POST /api/v1/auth/token`), and the URNs and key metadata `whoami` and `tinker auth login` show.

The SDK (0.38.0) with `pjwt_auth_enabled` exchanges its API key for a JWT once, then sends the JWT in
`X-API-Key` on every request and refreshes it in the background at half its lifetime. `RestClient.whoami`
reads the identity from the JWT's claims (`sub`, `org_id`, `email`) without a request.

A JWT here is HS256-signed with a secret kept in the server's database (tokens survive a restart) and
carries the owner id of the key it was exchanged for (`own`). It is accepted only while that key is still
one of the server's: a key removed from the configuration takes its tokens with it. Without API keys every
caller is the owner None, and a token is accepted (and ignored) like any key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import weakref
from typing import TYPE_CHECKING, Any

from eztinker.service.errors import InvalidTokenError

if TYPE_CHECKING:
    from eztinker.service.access import Access
    from eztinker.store import Store

JWT_PREFIX = "eyJ"  # base64url of '{"': how a JWT starts (a configured key that does is still a key)
JWT_SECONDS = 3600
ISSUER = "eztinker"
ORG_ID = "eztinker"
_SECRETS, _JWT_SECRET = "secret", "jwt"  # FacadeState namespace (the Tinker facade's) and key
_secret_cache: weakref.WeakKeyDictionary[Store, bytes] = weakref.WeakKeyDictionary()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _secret(access: Access) -> bytes:
    store = access.store
    cached = _secret_cache.get(store)
    if cached is not None:
        return cached
    durable = access._durable
    record = durable.get(_SECRETS, _JWT_SECRET)
    if record is None:
        durable.put(_SECRETS, _JWT_SECRET, {"key": secrets.token_hex(32)})
        record = durable.get(_SECRETS, _JWT_SECRET)
    assert record is not None
    secret = bytes.fromhex(record.value["key"])
    _secret_cache[store] = secret
    return secret


def short_id(owner: str | None) -> str:
    """A short, stable name of an owner (the first 16 hex digits of its key's hash; `local` without keys)."""
    return "local" if owner is None else owner[:16]


def user_urn(owner: str | None) -> str:
    return f"tml:user:{short_id(owner)}"


def key_id(owner: str | None) -> int:
    """The integer id `tinker auth login` stores the key under."""
    return 0 if owner is None else int(owner[:12], 16)


def mint(access: Access, owner: str | None, now: float | None = None) -> str:
    """A JWT for `owner` (the caller of `POST /auth/token`), valid for `JWT_SECONDS`."""
    issued = int(time.time() if now is None else now)
    header = {"alg": "HS256", "typ": "JWT"}
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": user_urn(owner),
        "org_id": ORG_ID,
        "email": "",  # not user-backed: whoami reports None
        "own": owner,
        "iat": issued,
        "exp": issued + JWT_SECONDS,
    }
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(_secret(access), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def owner_of(access: Access, token: str) -> str | None:
    """The owner a JWT of this server was minted for; `InvalidTokenError` unless it is valid, unexpired
    and its key is still one of the server's."""
    invalid = InvalidTokenError("the token is invalid or has expired: exchange the API key for a new one")
    try:
        header, payload, signature = token.split(".")
        expected = hmac.new(_secret(access), f"{header}.{payload}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(signature)):
            raise invalid
        claims = json.loads(_unb64(payload))
    except (ValueError, TypeError):
        raise invalid from None
    if not isinstance(claims, dict) or claims.get("iss") != ISSUER:
        raise invalid
    if not isinstance(claims.get("exp"), int | float) or claims["exp"] < time.time():
        raise invalid
    owner = claims.get("own")
    if access.enabled and owner not in access.key_hashes:
        raise invalid
    return owner if access.enabled else None
