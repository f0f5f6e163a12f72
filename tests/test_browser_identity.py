"""Real identity in a real browser (issue 23): a class server (no local mode, a long teacher
token) sends anonymous browsers to the sign-in form; class accounts and the teacher sign in
there; the session is a signed, HttpOnly cookie that page scripts can't read and nobody can
forge (the old crafted XSRF cookie, an edited or re-signed session cookie); being on localhost
(or behind a proxy) makes nobody the teacher; and OpenID Connect sign-in works against a local
provider (oidc-provider-mock on 127.0.0.1)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, REPO_ROOT, expect, free_port, healthy, settle, sync_api

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]

TOKEN = "teacher-" + "x7Qk2pLm9vR4sT8wZ1yB6nC3dF5gH0jK"


def start_server(tmp_path: Path, home: Path, extra_env: dict | None = None, args: list[str] = (),
                 port: int | None = None):
    port = port or free_port()
    log_path = tmp_path / f"server-{port}.log"
    env = dict(os.environ, FINETUNE_LAB_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               FINETUNE_LAB_ADMIN_TOKEN=TOKEN, **(extra_env or {}))
    env.pop("FINETUNE_LAB_LOCAL", None)
    cmd = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false", *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://localhost:{port}"
    end = time.monotonic() + 90
    while not healthy(f"{base}/_stcore/health"):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"streamlit did not start:\n{log_path.read_text()}")
        time.sleep(0.3)
    return proc, base, log_path


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def class_server(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FINETUNE_LAB_HOME", str(home))
    from core.serve import accounts
    made = accounts.create_class("lab", ["alice", "bob"])
    proc, base, log = start_server(tmp_path, home)
    yield base, {a.name: (a.id, code) for a, code in made}
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        expect.set_options(timeout=60_000)
        yield chromium
        chromium.close()


def signed_in_as(page) -> str:
    caption = page.get_by_test_id("stSidebar").get_by_text("Signed in as")
    expect(caption).to_be_visible()
    return caption.inner_text()


def sign_in_account(page, base, account, secret, new_password=""):
    page.goto(base)
    expect(page).to_have_url(f"{base}/lab/sign-in")            # anonymous: the wall
    page.fill("input[name=account]", account)
    page.fill("input[name=secret]", secret)
    if new_password:
        page.fill("input[name=new_password]", new_password)
    page.locator("form button", has_text="Sign in").first.click()


def edit_payload(value: str, change: dict) -> str:
    """The signed cookie's payload (itsdangerous: base64 JSON, zlib-compressed when it starts
    with '.') with `change` applied, keeping the old signature."""
    compressed = value.startswith(".")
    payload_b64, rest = value.lstrip(".").split(".", 1)
    raw = base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4))
    inner = json.loads(json.loads(zlib.decompress(raw) if compressed else raw))
    inner.update(change)
    new = base64.urlsafe_b64encode(json.dumps(json.dumps(inner)).encode()).decode().rstrip("=")
    return f"{new}.{rest}"


def session_cookie(context) -> dict:
    return next(c for c in context.cookies() if c["name"] == "_streamlit_user")


def test_class_accounts_and_the_teacher_sign_in_and_cookies_cant_be_forged(browser, class_server):
    base, codes = class_server
    alice_id, alice_code = codes["alice"]

    student = browser.new_context()
    page = student.new_page()
    sign_in_account(page, base, alice_id, alice_code, new_password="correct horse")
    expect(page.get_by_role("heading", name="Finetune Lab")).to_be_visible()
    assert alice_id in signed_in_as(page)
    assert "teacher" not in signed_in_as(page).lower()
    cookie = session_cookie(student)
    assert cookie["httpOnly"], cookie
    assert "_streamlit_user" not in page.evaluate("document.cookie")          # no page script reads it

    # the same account, a new browser: still alice (caps follow the person, not the browser)
    again = browser.new_context()
    page2 = again.new_page()
    sign_in_account(page2, base, alice_id, "correct horse")
    assert alice_id in signed_in_as(page2)
    again.close()

    # forgeries, each in a fresh browser: none is anyone
    value = cookie["value"]
    edited = edit_payload(value, {"lab_account": codes["bob"][0]})
    forged_values = [
        edited,                                                                 # bob's name, alice's signature
        "2|00000000|" + "ab" * 16 + f"|{int(time.time())}",                      # the old crafted XSRF cookie
        value[:-4] + ("AAAA" if not value.endswith("AAAA") else "BBBB"),        # a broken signature
    ]
    host = base.split("//")[1].split(":")[0]
    for forged in forged_values:
        context = browser.new_context()
        context.add_cookies([{"name": "_streamlit_user", "value": forged, "domain": host, "path": "/"},
                             {"name": "_streamlit_xsrf", "value": forged_values[1], "domain": host, "path": "/"}])
        p = context.new_page()
        p.goto(base)
        expect(p.get_by_text("Sign in to use this lab")).to_be_visible()
        assert "Signed in as" not in p.get_by_test_id("stSidebar").inner_text()
        context.close()

    # the teacher, with the token, on the same form
    teacher = browser.new_context()
    tpage = teacher.new_page()
    tpage.goto(base)
    tpage.locator("summary", has_text="Teacher token").click()
    tpage.fill("input[name=token]", TOKEN)
    tpage.locator("form button", has_text="Sign in as teacher").click()
    assert "teacher" in signed_in_as(tpage).lower()
    settle(tpage)
    tpage.get_by_text("Teacher (admin) settings").click()
    expect(tpage.get_by_text("Class accounts", exact=True)).to_be_visible()
    teacher.close()

    # a wrong token, again and again: refused, then rate-limited
    wrong = browser.new_context()
    wpage = wrong.new_page()
    statuses = []
    for _ in range(6):
        response = wpage.request.post(f"{base}/lab/sign-in", form={"kind": "teacher", "token": "guess"})
        statuses.append(response.status)
    assert statuses[:5] == [401] * 5 and statuses[5] == 429, statuses
    wrong.close()
    student.close()


@pytest.fixture
def oidc_provider(tmp_path):
    exe = Path(sys.executable).with_name("oidc-provider-mock")
    if not exe.exists() and not shutil.which("oidc-provider-mock"):
        pytest.fail("oidc-provider-mock is a test requirement (tests/requirements.txt)")
    port = free_port()
    log = open(tmp_path / "oidc.log", "w")
    proc = subprocess.Popen([str(exe if exe.exists() else shutil.which("oidc-provider-mock")), "--port", str(port),
                             "--user-claims", json.dumps({"sub": "t-1", "email": "teacher@school.org", "name": "Ms Teacher"}),
                             "--user-claims", json.dumps({"sub": "s-1", "email": "sam@school.org", "name": "Sam"})],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/.well-known/openid-configuration", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > end or proc.poll() is not None:
                pytest.fail((tmp_path / "oidc.log").read_text())
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(10)


def test_openid_connect_sign_in_against_a_local_provider(browser, oidc_provider, tmp_path):
    home = tmp_path / "home"
    port = free_port()
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f"""[auth]
redirect_uri = "http://localhost:{port}/oauth2callback"
cookie_secret = "a-test-cookie-secret-of-some-length"
client_id = "finetune-lab"
client_secret = "test-secret"
server_metadata_url = "{oidc_provider}/.well-known/openid-configuration"
""")
    proc, base, log = start_server(tmp_path, home, {"FINETUNE_LAB_TEACHER_EMAILS": "teacher@school.org"},
                                   ["--secrets.files", str(secrets)], port=port)   # redirect_uri's port
    try:
        for sub, expect_teacher in (("s-1", False), ("t-1", True)):
            context = browser.new_context()
            page = context.new_page()
            page.goto(base)
            expect(page).to_have_url(f"{base}/lab/sign-in")
            page.get_by_role("link", name="Sign in with your school account").click()
            page.wait_for_url(f"{oidc_provider}/**")
            page.fill("input[name=sub]", sub)
            page.locator("button[type=submit], input[type=submit]").first.click()
            page.wait_for_url(f"{base}/**")
            text = signed_in_as(page)
            assert ("teacher" in text.lower()) == expect_teacher, text
            assert session_cookie(context)["httpOnly"]
            context.close()
    finally:
        stop_server(proc)
