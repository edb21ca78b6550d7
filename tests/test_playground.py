"""The playground page (server/static/) in headless Chromium, against a FAKE endpoint: a stdlib
HTTP server here that serves the static files and answers /v1/models, /v1/vectors and streamed
/v1/chat/completions in the shape the server issue specifies (OpenAI chunks, `steering`,
`probe_scores`). It checks the page's side only: the requests it sends, and that the streamed
tokens show as sent, one coloured element each, text never parsed as HTML. The real server's
test (scripts/serve.py with a model) belongs with the server. UPDATE_SCREENSHOTS=1 copies the
screenshot to docs/playground.png."""
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from browser import Browser, available, console_errors
from conftest import ROOT

STATIC = os.path.join(ROOT, "server", "static")
PLAIN = ["Hello", " <script>alert(1)</script>", " world", "!"]
STEERED = ["What", " a", " <b>wonderful</b>", " day", "!"]
VECTORS = {"object": "list", "probe": {"source": "run/probes/lr.safetensors", "layer": 12},
           "data": [{"id": "sentiment", "object": "vector", "layers": [8, 12, 16],
                     "norms": {"8": 1.5, "12": 2.5, "16": 4.0},
                     "residual_norms": {"8": 90.0, "12": 130.0, "16": 200.0}}]}


def scores(tokens):
    return [round(0.7 * i - 1.0, 3) for i in range(len(tokens))]


class Fake(BaseHTTPRequestHandler):
    bodies = []

    def log_message(self, *args):
        pass

    def send(self, code, obj, kind="application/json"):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            return self.send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        if self.path == "/v1/vectors":
            return self.send(200, VECTORS)
        name = "index.html" if self.path == "/" else self.path.lstrip("/")
        path = os.path.join(STATIC, name)
        if "/" in name or not os.path.isfile(path):
            return self.send(404, {"error": {"message": "not found"}})
        kind = "text/html" if name.endswith(".html") else "text/javascript"
        with open(path, "rb") as f:
            self.send(200, f.read(), kind + "; charset=utf-8")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Fake.bodies.append(body)
        if body["messages"][0]["content"] == "bad":
            return self.send(400, {"error": {"message": "steering.multiplier must be finite",
                                             "type": "invalid_request_error",
                                             "param": "steering.multiplier"}})
        tokens = STEERED if "steering" in body else PLAIN
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i, (tok, s) in enumerate(zip(tokens, scores(tokens))):
            choice = {"index": 0, "delta": {"content": tok}, "finish_reason": None}
            if body.get("probe"):
                choice["probe_scores"] = [s]
                if i == 0:
                    choice["probe_prompt_score"] = 0.25
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


pytestmark = pytest.mark.skipif(not available(), reason="needs /usr/bin/chromium and "
                                "/usr/bin/chromedriver (make test installs them)")


def wait_done(driver, *panels):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: all(
        d.find_element("id", p).get_attribute("data-state") in ("done", "error") for p in panels))


def test_playground_streams_steered_and_unsteered(fake, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    Fake.bodies.clear()
    with Browser() as driver:
        driver.get(fake)
        WebDriverWait(driver, 20).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#layers input.layer"))
        layers = driver.find_elements(By.CSS_SELECTOR, "#layers input.layer")
        assert [x.get_attribute("value") for x in layers] == ["8", "12", "16"]
        assert [x.is_selected() for x in layers] == [False, True, False]
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("Tell me <i>something</i>")
        slider = driver.find_element(By.ID, "multiplier")
        for _ in range(3):
            slider.send_keys(Keys.ARROW_RIGHT)  # 0 -> 1.5 in steps of 0.5
        assert driver.find_element(By.ID, "multiplier-value").text == "1.5"
        driver.find_element(By.ID, "compare").click()
        driver.find_element(By.ID, "probe").click()
        driver.find_element(By.ID, "generate").click()
        wait_done(driver, "out-steered", "out-plain")
        assert driver.find_element(By.ID, "error").text == ""
        for panel, tokens in (("out-steered", STEERED), ("out-plain", PLAIN)):
            box = driver.find_element(By.CSS_SELECTOR, f"#{panel} .text")
            toks = box.find_elements(By.CSS_SELECTOR, ".tok")
            assert [t.get_attribute("textContent") for t in toks] == tokens
            assert box.get_attribute("textContent") == "".join(tokens)  # shown as text
            for t, s in zip(toks, scores(tokens)):
                assert t.get_attribute("title") == f"probe score {s:.4f}"
                assert t.value_of_css_property("background-color").startswith("rgba(")
            meta = driver.find_element(By.CSS_SELECTOR, f"#{panel} .meta").text
            assert meta.endswith("0.2500")
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 1
        assert console_errors(driver) == []
        path = str(tmp_path / "playground.png")
        driver.save_screenshot(path)
        if os.environ.get("UPDATE_SCREENSHOTS"):
            os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
            shutil.copy(path, os.path.join(ROOT, "docs", "playground.png"))
    steered, plain = sorted(Fake.bodies, key=lambda b: "steering" not in b)
    assert steered["steering"] == {"vector": "sentiment", "layers": [12], "multiplier": 1.5,
                                   "scale": "raw", "ablate": False, "positions": "all"}
    assert "steering" not in plain
    for b in (steered, plain):
        assert b["messages"] == [{"role": "user", "content": "Tell me <i>something</i>"}]
        assert b["seed"] == 0 and b["stream"] is True and b["probe"] is True
        assert b["model"] == "tiny"


def test_playground_shows_the_servers_error(fake):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with Browser() as driver:
        driver.get(fake)
        WebDriverWait(driver, 20).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#layers input.layer"))
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("bad")
        driver.find_element(By.ID, "generate").click()
        wait_done(driver, "out-steered")
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "error").text == (
            "HTTP 400: steering.multiplier must be finite (steering.multiplier)")
        assert driver.find_element(By.ID, "generate").is_enabled()
