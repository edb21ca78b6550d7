"""The playground page (server/static/) in headless Chromium against the REAL server:
scripts/serve.py with SmolLM2, a steering vector and a probe, in a subprocess on a free 127.0.0.1
port (tests/serving.py), one server and one browser for the module. Typing a prompt, moving the
multiplier and pressing generate shows streamed tokens equal to the non-streamed API answer for
the same settings (chat and plain, steered and unsteered), each coloured with its probe score when
the probe is on, model text shown as text, and a request the server refuses shows its 4xx error.
UPDATE_SCREENSHOTS=1 copies the screenshot to docs/playground.png."""
import json
import os
import shutil

import numpy as np
import pytest
from browser import Browser, available, console_errors
from conftest import ROOT, shown_numbers
from safetensors.numpy import save_file
from serving import Served

from llama.gguf import default_model_path

pytestmark = pytest.mark.skipif(not available(), reason="needs /usr/bin/chromium and "
                                "/usr/bin/chromedriver (make test installs them)")

PROBE_LAYER = 12
WAIT_S = 300  # a shared 2-core machine can take a while for a few dozen SmolLM2 tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """SmolLM2 with a vector `push` at layers 10, 12 and 14 (norm 40: a visible push at residual
    norms of ~100-190 there) and a linear probe at layer 12 (random weights)."""
    base = tmp_path_factory.mktemp("playground")
    rng = np.random.default_rng(0)
    vectors = base / "push"
    vectors.mkdir()
    for layer in (10, 12, 14):
        v = rng.standard_normal(576).astype(np.float32)
        save_file({"vector": v / np.linalg.norm(v) * 40},
                  str(vectors / f"layer_{layer}.safetensors"))
    # a contrast probe: a direction (bias 0) and its sides' training means, which set its
    # decision threshold; it records its chosen layer, so no --probe_layer
    direction = (rng.standard_normal((1, 576)) / 100).astype(np.float32)
    mean = rng.standard_normal((1, 2, 576)).astype(np.float32) * 4
    probe = base / "ccs.safetensors"
    save_file({"direction": direction, "mean": mean, "layers": np.array([PROBE_LAYER])},
              str(probe))
    (base / "ccs.json").write_text(json.dumps({
        "method": "ccs", "hidden_dim": 576, "sides": ["plus", "minus"],
        "chosen_layer": PROBE_LAYER, "text": "cities.csv, contrast pairs, in the chat template",
        "positive_class": "label 1 = the plus side is the true one"}))
    args = ["--model", default_model_path(), "--vectors", vectors, "--probe", probe,
            "--max_batch", 2, "--threads", 1]
    with Served(map(str, args)) as s:
        s.threshold = float(direction[0].astype(np.float64) @ mean[0].astype(np.float64).mean(0))
        yield s


@pytest.fixture(scope="module")
def driver():
    with Browser() as chromium:
        yield chromium


def open_page(driver, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    console_errors(driver)  # start from an empty console log
    driver.get(server.url + "/")
    WebDriverWait(driver, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#layers input.layer")
        and not d.find_element(By.ID, "probe").get_attribute("disabled"))


def fill(driver, field, value):
    box = driver.find_element("id", field)
    box.clear()
    box.send_keys(value)


def move_multiplier(driver, steps):
    from selenium.webdriver.common.keys import Keys

    slider = driver.find_element("id", "multiplier")
    for _ in range(steps):
        slider.send_keys(Keys.ARROW_RIGHT)
    return float(driver.find_element("id", "multiplier-value").text)


def generate(driver, *panels):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element("id", "generate").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: all(
        d.find_element("id", p).get_attribute("data-state") in ("done", "error")
        for p in panels) and d.find_element("id", "generate").is_enabled())


def shown(driver, panel) -> dict:
    """What a panel shows: its token spans' text, hover titles, background colours and meta."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, f"#{panel} .text")
    toks = box.find_elements(By.CSS_SELECTOR, ".tok")
    return {"pieces": [t.get_attribute("textContent") for t in toks],
            "titles": [t.get_attribute("title") for t in toks],
            "scores": [t.get_attribute("data-score") for t in toks],
            "margins": [t.get_attribute("data-margin") for t in toks],
            "title": driver.find_element(By.CSS_SELECTOR, f"#{panel} h2").text,
            "colours": [t.value_of_css_property("background-color") for t in toks],
            "text": box.get_attribute("textContent"),
            "meta": driver.find_element(By.CSS_SELECTOR, f"#{panel} .meta").text}


def api_answer(server, body, chat) -> dict:
    """The same request, not streamed -> its pieces (one per token), text and probe fields."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = server.post(path, {**body, "logprobs": True if chat else 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if chat:
        pieces = [t["token"] for t in choice["logprobs"]["content"]]
        text = choice["message"]["content"]
    else:
        pieces, text = choice["logprobs"]["tokens"], choice["text"]
    return {"pieces": pieces, "text": text, "scores": choice.get("probe_scores"),
            "margins": choice.get("probe_margins"),
            "prompt_score": choice.get("probe_prompt_score"),
            "prompt_margin": choice.get("probe_prompt_margin")}


def test_chat_compare_with_probe_equals_the_api(server, driver, tmp_path):
    """Chat mode, the multiplier moved to 2, compare and probe on: both panels stream the API's
    tokens for the same settings, each coloured by its probe margin (score minus the probe's
    decision threshold: red above, blue below) under a colour key, titled with its score and
    margin; the page says what the probe was trained on and which panel is steered."""
    from selenium.webdriver.common.by import By

    open_page(driver, server)
    assert driver.find_element(By.ID, "model").text == server.model
    layers = driver.find_elements(By.CSS_SELECTOR, "#layers input.layer")
    assert [x.get_attribute("value") for x in layers] == ["10", "12", "14"]
    assert [x.is_selected() for x in layers] == [False, True, False]  # the middle one
    prompt = "Tell me about your day."
    fill(driver, "prompt", prompt)
    fill(driver, "max_tokens", "16")
    assert move_multiplier(driver, 4) == 2.0  # 0 -> 2 in steps of 0.5
    driver.find_element(By.ID, "compare").click()
    driver.find_element(By.ID, "probe").click()
    generate(driver, "out-steered", "out-plain")
    assert driver.find_element(By.ID, "error").text == ""
    page = {p: shown(driver, p) for p in ("out-steered", "out-plain")}
    assert console_errors(driver) == []
    path = str(tmp_path / "playground.png")
    driver.save_screenshot(path)
    if os.environ.get("UPDATE_SCREENSHOTS"):
        os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
        shutil.copy(path, os.path.join(ROOT, "docs", "playground.png"))

    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
            "temperature": 0, "top_p": 1, "seed": 0, "probe": True}
    steer = {"vector": "push", "layers": [12], "multiplier": 2.0, "scale": "raw",
             "ablate": False, "positions": "all"}
    want = {"out-steered": api_answer(server, {**body, "steering": steer}, chat=True),
            "out-plain": api_answer(server, body, chat=True)}
    assert want["out-steered"]["text"] != want["out-plain"]["text"]  # the push shows
    for panel, got in page.items():
        api = want[panel]
        assert got["pieces"] == api["pieces"] and got["text"] == api["text"], panel
        assert len(api["scores"]) == len(api["pieces"]) == 16
        # the streamed panels ran side by side (a batch of 2), the API alone: the same forward
        # in another batch shape sums in another order, so scores agree to ~1e-4, not bitwise
        assert [float(x) for x in got["scores"]] == pytest.approx(api["scores"], abs=2e-3)
        titled = [shown_numbers(t) for t in got["titles"]]  # 4 places in the hover title
        assert all(t[0] == pytest.approx(a, abs=2e-3) for t, a in zip(titled, api["scores"]))
        assert api["margins"] == pytest.approx([x - server.threshold for x in api["scores"]])
        assert [float(x) for x in got["margins"]] == pytest.approx(api["margins"], abs=2e-3)
        assert all(t[1] == pytest.approx(a, abs=2e-3) for t, a in zip(titled, api["margins"]))
        for c, m in zip(got["colours"], api["margins"]):  # red above the threshold, blue below
            if abs(m) > 2e-3:
                assert c.startswith("rgba(214, 39, 40" if m > 0 else "rgba(31, 119, 180"), c
        meta = shown_numbers(got["meta"])  # margin, then score, of the prompt's last token
        assert meta == pytest.approx([api["prompt_margin"], api["prompt_score"]], abs=2e-3)
    assert page["out-steered"]["title"] == "steered: push, layer 12, multiplier 2 (raw)"
    assert page["out-plain"]["title"] == "unsteered"
    key = driver.find_element(By.ID, "probe-key")
    biggest = max(abs(float(x)) for p in page.values() for x in p["margins"])
    assert key.is_displayed() and shown_numbers(key.text)[-2:] == pytest.approx(
        [-biggest, biggest], rel=5e-3)
    assert "trained on cities.csv, contrast pairs" in driver.find_element(By.ID,
                                                                          "probe-text").text


def test_plain_mode_shows_model_text_as_text(server, driver):
    """Plain completion of a prompt full of HTML, two layers and positions=generated, no probe:
    the tokens equal the API's, the model's `<script>` shows as text, and nothing is coloured."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(driver, server)
    driver.find_element(By.CSS_SELECTOR, "input[name=mode][value=plain]").click()
    prompt = "<script>alert(1)</script>\n<script>alert(2)</script>\n<script>"
    fill(driver, "prompt", prompt)
    fill(driver, "max_tokens", "12")
    driver.find_element(By.CSS_SELECTOR, "#layers input.layer[value='10']").click()
    Select(driver.find_element(By.ID, "positions")).select_by_value("generated")
    multiplier = move_multiplier(driver, 2)
    generate(driver, "out-steered")
    assert driver.find_element(By.ID, "error").text == ""
    got = shown(driver, "out-steered")
    assert console_errors(driver) == []
    steer = {"vector": "push", "layers": [10, 12], "multiplier": multiplier, "scale": "raw",
             "ablate": False, "positions": "generated"}
    api = api_answer(server, {"prompt": prompt, "max_tokens": 12, "temperature": 0, "top_p": 1,
                              "seed": 0, "steering": steer}, chat=False)
    assert got["pieces"] == api["pieces"] and got["text"] == api["text"]
    assert "</script>" in api["text"]  # the model closes the tag; the page shows it as text
    assert len(driver.find_elements(By.TAG_NAME, "script")) == 1
    assert got["titles"] == [""] * len(api["pieces"])
    assert set(got["colours"]) == {"rgba(0, 0, 0, 0)"}  # no probe: no colour
    assert got["meta"] == ""
    assert driver.find_element(By.ID, "out-plain").get_attribute("hidden")


def test_switching_the_scale_converts_the_multiplier(server, driver):
    """Raw 8 at layer 12 pushes 8 x |vector| / residual norm there: switching to residual shows
    that push (to the slider's steps, within its range), and a note says so."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(driver, server)
    assert move_multiplier(driver, 16) == 8.0
    info = server.http.get("/v1/vectors").json()["data"][0]
    want = 8 * info["norms"]["12"] / info["residual_norms"]["12"]
    Select(driver.find_element(By.ID, "scale")).select_by_value("residual")
    shown_now = float(driver.find_element(By.ID, "multiplier-value").text)
    assert shown_now == pytest.approx(min(2.0, max(-2.0, want)), abs=0.025 + 1e-9)
    note = driver.find_element(By.ID, "scale-note").text
    assert shown_numbers(note)[0] == pytest.approx(want, rel=5e-3) and "layer 12" in note
    Select(driver.find_element(By.ID, "scale")).select_by_value("raw")
    back = float(driver.find_element(By.ID, "multiplier-value").text)
    assert back == pytest.approx(shown_now / want * 8, abs=0.25 + 1e-9)  # the push kept


def test_a_refused_request_shows_the_servers_error(server, driver):
    """A temperature the server refuses: its 4xx message in the error line, the button usable
    again, and the next request from the page succeeds."""
    from selenium.webdriver.common.by import By

    open_page(driver, server)
    fill(driver, "max_tokens", "3")
    fill(driver, "temperature", "-1")
    generate(driver, "out-steered")
    assert driver.find_element(By.ID, "out-steered").get_attribute("data-state") == "error"
    error = driver.find_element(By.ID, "error").text
    assert error.startswith("HTTP 400: ") and error.endswith("(temperature)"), error
    fill(driver, "temperature", "0")
    generate(driver, "out-steered")
    assert driver.find_element(By.ID, "error").text == ""
    assert driver.find_element(By.ID, "out-steered").get_attribute("data-state") == "done"
    assert len(shown(driver, "out-steered")["pieces"]) == 3
