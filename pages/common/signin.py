"""The sign-in routes of the lab's web server (Starlette, beside Streamlit's own; see
streamlit_app.py): a plain HTML form for class accounts and the teacher token that, on success,
sets the same signed, HttpOnly `_streamlit_user` cookie that `st.login` sets, so `st.user` reads
it and no page script in the browser can. Anonymous browsers are sent here before the app loads
(unless the server runs in local single-user mode)."""
from __future__ import annotations

import html
import json
import os

from core.serve import access, accounts

USER_COOKIE = "_streamlit_user"
OPEN_PREFIXES = ("/_stcore", "/static", "/media", "/component", "/auth", "/oauth2callback", "/lab/",
                 "/app/static", "/favicon")


def _client(request) -> str:
    return request.client.host if request.client else ""


def _origin(request) -> str:
    return request.headers.get("origin") or f"{request.url.scheme}://{request.url.netloc}"


def _set_session(response, request, claims: dict) -> None:
    from streamlit.web.server.starlette.starlette_auth_routes import _set_single_cookie
    payload = dict(claims, is_logged_in=True, origin=_origin(request))
    _set_single_cookie(response, USER_COOKIE, json.dumps(payload))


def providers() -> list[str]:
    """The OpenID providers configured in Streamlit's secrets ([auth] or [auth.NAME])."""
    try:
        import streamlit as st
        auth = dict(st.secrets.get("auth", {}))
    except Exception:  # noqa: BLE001 - no secrets file: no provider
        return []
    named = [k for k, v in auth.items() if isinstance(v, dict) and "client_id" in v]
    return named or (["default"] if "client_id" in auth else [])


async def sign_in_page(request):
    from starlette.responses import HTMLResponse, RedirectResponse
    message, status = "", 200
    if request.method == "POST":
        form = await request.form()
        try:
            claims = _check(form, _client(request))
        except accounts.RateLimited as err:
            message, status = str(err), 429
        except accounts.AccountError as err:
            message, status = str(err), 401
        else:
            response = RedirectResponse("/", status_code=303)
            _set_session(response, request, claims)
            return response
    elif request.query_params.get("provider"):
        return RedirectResponse(_provider_login(request.query_params["provider"]), status_code=302)
    return HTMLResponse(_form(message), status_code=status,
                        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"})


def _check(form, client: str) -> dict:
    kind = form.get("kind", "")
    if kind == "teacher":
        token = _admin_token()
        accounts.teacher_sign_in(str(form.get("token", "")), token, client)
        return accounts.teacher_claims(token)
    account = accounts.sign_in(str(form.get("account", "")), str(form.get("secret", "")), client,
                               new_password=str(form.get("new_password", "")))
    return accounts.account_claims(account)


def _admin_token() -> str:
    from pages.common.ownership import admin_token
    return admin_token()


def _provider_login(provider: str) -> str:
    from streamlit.auth_util import encode_provider_token
    name = provider if provider in providers() else "default"
    return "/auth/login?provider=" + encode_provider_token(name)


def _form(message: str) -> str:
    buttons = "".join(f'<p><a class="button" href="/lab/sign-in?provider={html.escape(p)}">Sign in with '
                      f'{html.escape("your school account" if p == "default" else p)}</a></p>' for p in providers())
    teacher = "" if not _admin_token() else """
<details><summary>Teacher token</summary>
<form method="post"><input type="hidden" name="kind" value="teacher">
<label>Teacher token <input name="token" type="password" autocomplete="off" required></label>
<button type="submit">Sign in as teacher</button></form></details>"""
    error = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Sign in · Finetune Lab</title>
<style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem;color:#262730}}
label{{display:block;margin:.6rem 0}} input{{width:100%;padding:.45rem;font-size:1rem;box-sizing:border-box}}
button,.button{{background:#ff4b4b;color:#fff;border:0;border-radius:.4rem;padding:.55rem 1rem;font-size:1rem;
text-decoration:none;display:inline-block;cursor:pointer}} .error{{color:#b00020}} small{{color:#555}}
details{{margin-top:1.5rem}}</style></head><body>
<h1>Finetune Lab</h1>{error}{buttons}
<h2>Class account</h2>
<form method="post"><input type="hidden" name="kind" value="account">
<label>Account name <input name="account" autocomplete="username" required></label>
<label>Password, or the join code from your teacher's sheet
<input name="secret" type="password" autocomplete="current-password" required></label>
<label>First time (with a join code): choose a password of at least {accounts.MIN_PASSWORD} characters
<input name="new_password" type="password" autocomplete="new-password"></label>
<button type="submit">Sign in</button></form>
<p><small>Forgot your password? Your teacher can print you a new join code.</small></p>{teacher}
</body></html>"""


class SignInWall:
    """ASGI middleware: a browser without a sign-in cookie asking for a page of the app is sent
    to the sign-in form. (The pages check the cookie's content themselves: this only saves a
    student a blank app.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "GET" and _walled(scope):
            from starlette.requests import Request
            from starlette.responses import RedirectResponse
            request = Request(scope)
            if not any(name.startswith(USER_COOKIE) for name in request.cookies):
                await RedirectResponse("/lab/sign-in", status_code=302)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _walled(scope) -> bool:
    path = scope.get("path", "/")
    if access.local_mode() or path.startswith(OPEN_PREFIXES):
        return False
    accept = dict(scope.get("headers") or []).get(b"accept", b"")
    return b"text/html" in accept


def routes() -> list:
    from starlette.routing import Route
    return [Route("/lab/sign-in", sign_in_page, methods=["GET", "POST"])]


def middleware() -> list:
    from starlette.middleware import Middleware
    return [Middleware(SignInWall)]


def cookie_secret() -> str:
    """Streamlit signs the sign-in cookie with this: kept in the data directory, so a restart
    signs nobody out (FINETUNE_LAB_HOME must be set before the server starts)."""
    return os.environ.get("STREAMLIT_SERVER_COOKIE_SECRET") or accounts.lab_secret().hex()
