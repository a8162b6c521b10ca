"""MONAI Label's own authentication (``MONAI_LABEL_AUTH_ENABLE=true``, Keycloak), made to work.

MONAI Label 0.8.5 checks a bearer token with ``jwt.decode(token, key, options=...)`` and no
``algorithms``, which PyJWT >= 2 (what it requires) refuses for every token: with auth enabled,
valid tokens are answered 401 like invalid ones. The app overrides that one dependency through
FastAPI's ``dependency_overrides`` (MONAI Label's code and its roles checks are untouched) with
the same check — the realm's public key, expiry, the configured username and roles claims —
given the asymmetric algorithms Keycloak signs with. Symmetric algorithms (HS*) are never
accepted: the key is public.
"""

from __future__ import annotations

import jwt
import requests
from fastapi import Depends, FastAPI, HTTPException, status
from monailabel.config import settings
from monailabel.endpoints.user import auth

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


def user_from_token(token: str) -> auth.User:
    key = auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
    payload = jwt.decode(token, key, algorithms=ALGORITHMS, options={"verify_aud": False, "require": ["exp"]})
    roles = payload
    for claim in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):  # e.g. realm_access#roles
        roles = roles.get(claim) if isinstance(roles, dict) else None
    return auth.User(
        username=str(payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or ""),
        email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=list(roles or []),
    )


async def current_user(token: str = Depends(auth.oauth2_scheme)) -> auth.User:
    try:
        return user_from_token(token)
    except jwt.InvalidTokenError as error:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail=f"Could not validate credentials: {error}",
            headers={"WWW-Authenticate": "Bearer"},
        ) from error
    except requests.RequestException as error:
        raise HTTPException(status_code=503, detail=f"authentication server unreachable: {error}") from error


def install(app: FastAPI) -> None:
    if settings.MONAI_LABEL_AUTH_ENABLE:
        app.dependency_overrides[auth.get_current_user] = current_user
