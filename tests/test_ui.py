"""The playground page (/ui) in a real browser: Debian's chromium driven by Selenium.

The browser test needs `chromium` + `chromium-driver` (`make test` installs them where it can,
as root with apt); without them it is skipped with a message saying so. The auth and routing
checks below it need no browser.

Set PEFTSERVE_UI_SCREENSHOT=path.png to save a screenshot of the page after the side-by-side run
(how docs/playground.png was made).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from peftserve.server.state import ServerSettings
from tests.test_adapters_api import adapter_server, lib  # noqa: F401  (fixtures)

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
PROMPT = "The capital of France is"
SETTINGS = {"max_new_tokens": 8, "temperature": 0.05, "seed": 3}


def _ia3_artifact(lib, out: Path) -> Path:
    from peft import IA3Config, get_peft_model

    base = lib.base()
    torch.manual_seed(21)
    pm = get_peft_model(base, IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                        feedforward_modules=["down_proj"]))
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)
    return out


def _register(server, name: str, d: Path) -> None:
    server.registry.add(name, (d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes())


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("no system chromium + chromedriver (apt-get install chromium chromium-driver; "
                    "`make test` does this where it runs as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 60):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # A condition may look at an element just as the page replaces it (a form submit navigates);
    # that is "not yet", not a failure.
    wait = WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])
    return wait.until(lambda d: condition(d))


def _attr(driver, css: str, name: str):
    """The attribute of the first element matching ``css`` (None if none), read in one script so
    a navigation between finding the element and reading it cannot leave a stale reference."""
    script = "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;"
    return driver.execute_script(script, css, name)


def test_side_by_side_upload_and_errors_in_a_real_browser(browser, adapter_server, lib, live_server, tmp_path):
    from selenium.webdriver.common.by import By

    server = adapter_server()
    _register(server, "lora-qv", lib.get("qv").dir)
    _register(server, "soft", lib.get("soft").dir)
    _register(server, "ia3", _ia3_artifact(lib, tmp_path / "ia3"))
    live = live_server(server.app)

    browser.get(f"{live.url}/ui")
    _wait(browser, lambda d: _attr(d, "body", "data-ready") == "1")
    for name in ("lora-qv", "soft", "ia3"):
        browser.find_element(By.CSS_SELECTOR, f'.adapter[data-name="{name}"] input').click()
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    for field, value in (("max-new-tokens", SETTINGS["max_new_tokens"]), ("temperature", SETTINGS["temperature"]),
                         ("seed", SETTINGS["seed"])):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    browser.find_element(By.ID, "run").click()
    _wait(browser, lambda d: _attr(d, "#columns", "data-state") == "done", timeout=120)

    columns = browser.find_elements(By.CSS_SELECTOR, "#columns .column")
    assert [c.get_attribute("data-adapter") for c in columns] == ["(base)", "ia3", "lora-qv", "soft"]  # sorted
    seen = set()
    for col in columns:
        assert col.get_attribute("data-state") == "done", col.text
        name = col.get_attribute("data-adapter")
        body = {"prompt": PROMPT, **SETTINGS, **({} if name == "(base)" else {"adapter": name})}
        ref = httpx.post(f"{live.url}/generate", json=body, timeout=60).json()
        assert json.loads(col.get_attribute("data-token-ids")) == ref["token_ids"], name
        assert col.get_attribute("data-text") == ref["text"], name
        assert col.find_element(By.CSS_SELECTOR, ".out").get_attribute("textContent") == ref["text"], name
        assert "TTFT" in col.find_element(By.CSS_SELECTOR, ".stats").text
        seen.add(tuple(ref["token_ids"]))
    assert len(seen) == 4, "every adapter should answer differently: the comparison would be vacuous"
    if os.environ.get("PEFTSERVE_UI_SCREENSHOT"):
        _wait(browser, lambda d: _attr(d, "#metrics", "data-updated") is not None)
        browser.save_screenshot(os.environ["PEFTSERVE_UI_SCREENSHOT"])

    # upload a file pair through the page's form, then see it listed
    art = lib.get("mlp")
    _upload(browser, "uploaded-mlp", art.dir / "adapter_config.json", art.dir / "adapter_model.safetensors")
    _wait(browser, lambda d: _attr(d, "#upload-result", "data-code") is not None)
    assert _attr(browser, "#upload-result", "data-code") == "ok", browser.find_element(By.ID, "upload-result").text
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '.adapter[data-name="uploaded-mlp"]'))
    assert "uploaded-mlp" in [v.name for v in server.registry.list()]

    # a bad upload: the error code and plain words are shown, nothing registered
    bad = tmp_path / "adapter_model.safetensors"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 4)
    _upload(browser, "bad-one", art.dir / "adapter_config.json", bad)
    _wait(browser, lambda d: _attr(d, "#upload-result", "data-code") not in (None, "ok"))
    result = browser.find_element(By.ID, "upload-result").text
    assert _attr(browser, "#upload-result", "data-code") == "invalid_safetensors"
    assert result.startswith("invalid_safetensors: ") and "not a valid safetensors file" in result
    assert "bad-one" not in [v.name for v in server.registry.list()]


def test_with_only_the_api_key_the_page_lists_adapters_from_v1_models(browser, adapter_server, lib, live_server):
    """A user who may generate but not manage adapters still picks them (read-only listing)."""
    from selenium.webdriver.common.by import By

    server = adapter_server(settings=ServerSettings(api_key="user-key-1", admin_key="admin-key-1"))
    _register(server, "lora-qv", lib.get("qv").dir)
    live = live_server(server.app)
    browser.get(f"{live.url}/ui")
    assert "peftserve playground: sign in" in browser.title
    browser.find_element(By.NAME, "key").send_keys("user-key-1")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(browser, lambda d: _attr(d, "body", "data-ready") == "1")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '.adapter[data-name="lora-qv"]'))
    assert "need the admin key" in browser.find_element(By.ID, "adapters-note").text
    row = browser.find_element(By.CSS_SELECTOR, '.adapter[data-name="lora-qv"]')
    assert "LORA" in row.text and not row.find_elements(By.CSS_SELECTOR, "button.delete")
    row.find_element(By.CSS_SELECTOR, "input").click()
    browser.find_element(By.CSS_SELECTOR, '.adapter[data-name="(base)"] input').click()  # only the adapter
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    browser.find_element(By.ID, "run").click()
    _wait(browser, lambda d: _attr(d, "#columns", "data-state") == "done", timeout=120)
    (col,) = browser.find_elements(By.CSS_SELECTOR, "#columns .column")
    ref = httpx.post(f"{live.url}/generate", json={"prompt": PROMPT, "max_new_tokens": 32, "seed": 0, "adapter": "lora-qv"},
                     headers={"Authorization": "Bearer user-key-1"}, timeout=60).json()
    assert col.get_attribute("data-state") == "done" and json.loads(col.get_attribute("data-token-ids")) == ref["token_ids"]


def _upload(browser, name: str, config: Path, weights: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.execute_script("document.getElementById('upload-result').removeAttribute('data-code')")
    form = browser.find_element(By.ID, "upload")
    box = form.find_element(By.NAME, "name")
    box.clear()
    box.send_keys(name)
    form.find_element(By.NAME, "adapter_config").send_keys(str(config))
    form.find_element(By.NAME, "adapter_model").send_keys(str(weights))
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


# ---------------------------------------------------------------- auth and routing (no browser)


@pytest.mark.anyio
async def test_ui_is_behind_the_api_key_and_login_sets_a_cookie(make_server):
    server = make_server(settings=ServerSettings(api_key="user-key-1", admin_key="admin-key-1"))
    async with server.client() as c:
        page = await c.get("/ui")
        assert page.status_code == 401 and 'action="/ui/login"' in page.text
        assert (await c.get("/ui/static/app.js")).status_code == 401
        assert (await c.get("/ui/static/style.css")).status_code == 200  # the login page needs it
        bad = await c.post("/ui/login", content=b"key=wrong", headers={"content-type": "application/x-www-form-urlencoded"})
        assert bad.status_code == 403 and "peftserve_key" not in bad.headers.get("set-cookie", "")
        ok = await c.post("/ui/login", content=b"key=user-key-1",
                          headers={"content-type": "application/x-www-form-urlencoded"})
        assert ok.status_code == 303 and "samesite=strict" in ok.headers["set-cookie"].lower()
        page = await c.get("/ui", cookies={"peftserve_key": "user-key-1"})
        assert page.status_code == 200 and "/ui/static/app.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert (await c.get("/ui", headers={"Authorization": "Bearer admin-key-1"})).status_code == 200
        # the cookie opens the page only, never the API
        gen = await c.post("/generate", json={"prompt": "hi", "max_new_tokens": 1}, cookies={"peftserve_key": "user-key-1"})
        assert gen.status_code == 401


@pytest.mark.anyio
async def test_ui_assets_are_an_allow_list_and_no_ui_turns_it_off(make_server):
    server = make_server()
    async with server.client() as c:
        assert (await c.get("/ui")).status_code == 200
        js = await c.get("/ui/static/app.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        for path in ("/ui/static/login.html", "/ui/static/..%2Fui.py", "/ui/static/index.html"):
            resp = await c.get(path)
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", path
    off = make_server(settings=ServerSettings(ui=False))
    async with off.client() as c:
        assert (await c.get("/ui")).status_code == 404
