"""The HTML report (report/, scripts/report.py, the --report flags): its numbers are the runs' own,
its token heat-map holds the cache's tokens and projections with text escaped, bad input is one
line; then the page itself in headless Chromium (no console error, every plot drawn, one coloured
element per token, a <script> prompt shown as text). UPDATE_SCREENSHOTS=1 also copies the
browser's screenshots to docs/ (the README's pictures)."""
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from browser import Browser, available, console_errors
from conftest import ROOT, in_process, one_line_error, shown, shown_numbers
from activations.cache import ActivationCache
from pages.build import Tokens, build
from report_fixtures import EVIL, LAYERS, make_runs, read_json_blob, script

pytestmark = pytest.mark.usefixtures("one_thread")


def steering_panels(folder) -> int:
    """How many steering.csv columns deserve a panel, counted here from the CSV: the numeric
    columns but the grid (layer, multiplier, n, push) and the interval bounds."""
    st = pd.read_csv(os.path.join(folder, "steering.csv"))
    skip = {"layer", "multiplier", "n", "push"}
    return sum(1 for c in st.columns if c not in skip and not c.endswith(("_lo", "_hi"))
               and pd.to_numeric(st[c], errors="coerce").notna().any())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("report"))
    out = make_runs(tmp)
    out["page"] = os.path.join(tmp, "report.html")
    out["probe"] = os.path.join(out["probes"], "probes", "lr.safetensors")
    r = script("report.py", out["probes"], out["cached"], out["steering"], "--output",
               out["page"], "--tokens", out["cache"], "--direction", out["probe"],
               "--examples", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"wrote {out['page']}"
    with open(out["page"], encoding="utf-8") as f:
        out["html"] = f.read()
    return out


def test_numbers_are_the_runs_own(runs):
    page = runs["html"]
    summary = pd.read_csv(os.path.join(runs["probes"], "summary.csv"))
    for _, r in summary.iterrows():  # the page shows each CSV value to 3 decimals
        row = re.search(rf"<tr><td class=\"text\">{r.method}</td>(.*?)</tr>", page).group(1)
        cells = dict(zip(["layer", "n", "val_accuracy", "accuracy"],
                         re.findall(r"<td[^>]*>(.*?)</td>", row)))
        assert float(cells["accuracy"]) == pytest.approx(r.accuracy, abs=5e-4 + 1e-9)
    steering = pd.read_csv(os.path.join(runs["steering"], "steering.csv"))
    assert shown(steering.p_positive_hi.head(5), page, 3)
    for name in ("eval.csv", "summary.csv", "split.csv", "probe_stats_layer1.csv",
                 "steering.csv", "samples.jsonl"):
        assert f"<code>{name}</code>" in page
    split = pd.read_csv(os.path.join(runs["probes"], "split.csv"))["split"].value_counts()
    assert f"train {split['train']}, test {split['test']}, val {split['val']}" in page
    # probes; cached; one per steering metric
    assert page.count('<figure class="plot"') == 1 + 2 + steering_panels(runs["steering"])
    # nothing fetched: no link, no source or import, links only to fragments within the page
    assert not re.search(r"<link|<img|<iframe|@import|src=|url\((?!#)", page)
    assert not re.search(r"href=\"(?!#)", page)


def test_heatmap_tokens_and_scores_are_the_caches(runs):
    from llama.tokenizer import load_tokenizer

    page, tok = runs["html"], load_tokenizer(runs["tokenizer"])
    blob = read_json_blob(page)
    assert blob["layers"] == list(LAYERS)
    shown = [int(n) for n in re.findall(r'class="prompt" data-tokens="(\d+)"', page)]
    heads = re.findall(r"<h3>prompt (q\d+) \((\w+)\)", page)
    assert len(shown) == 5 and [c for _, c in heads].count("testing") >= 2
    cache = ActivationCache(runs["cache"])
    off = cache.offsets("prompt")
    probe = load_file(runs["probe"])  # a single-prompt probe: its own score x . w_raw + b_raw
    assert blob["calibrated"] and all(blob["centre"][str(l)] == 0.0 for l in LAYERS)
    for (pid, _), n in zip(heads, shown):
        i = int(pid[1:])
        assert n == runs["lengths"][i] == off[i + 1] - off[i]
        for j, layer in enumerate(LAYERS):
            want = (cache.array(layer, "prompt")[off[i]:off[i + 1]] @ probe["w_raw"][j, 0]
                    + probe["b_raw"][j])
            got = np.array(blob["scores"][str(layer)][heads.index((pid, _))])
            # float32 states, rounded to 5 decimals in the page: 1e-3 relative is ample
            assert np.allclose(got, want, rtol=1e-3, atol=1e-3)
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" not in page  # escaped token by token instead
    spans = re.search(r'<h3>prompt q1 .*?<div class="prompt"[^>]*>(.*?)</div>', page).group(1)
    pieces = re.findall(r'<span class="tok">(.*?)</span>', spans)
    import html as H

    assert "".join(H.unescape(p) for p in pieces) == EVIL  # this tokenizer has no BOS
    assert "&lt;" in spans and "<b>" not in spans


def test_report_flags_write_run_pages(runs):
    for run in (runs["probes"], runs["cached"]):
        with open(os.path.join(run, "report.html"), encoding="utf-8") as f:
            page = f.read()
        assert page.startswith("<!DOCTYPE html>") and '<figure class="plot"' in page
    with open(os.path.join(runs["cached"], "report.html"), encoding="utf-8") as f:
        assert 'class="heatmap"' in f.read()  # analyze_probe_from_cache --report on a token-all
    # steer.py --report makes the same call on its output folder
    from pages.build import write_run_report

    path = write_run_report(runs["steering"])
    assert open(path, encoding="utf-8").read().count('data-plot="steering-') == \
        steering_panels(runs["steering"])


def test_bad_input_is_one_line(runs, tmp_path):
    r = script("report.py", str(tmp_path), "--output", str(tmp_path / "r.html"))
    one_line_error(r, "holds no run outputs")
    r = script("report.py", runs["probes"], "--tokens", runs["mean_cache"], "--direction",
               runs["probe"], "--output", str(tmp_path / "r.html"))
    one_line_error(r, "--token all")
    r = script("report.py", runs["probes"], "--tokens", runs["cache"], "--layer", "7",
               "--output", str(tmp_path / "r.html"))
    one_line_error(r, "--layer 7")
    r = script("report.py", runs["probes"], "--direction", runs["probe"],
               "--output", str(tmp_path / "r.html"))
    one_line_error(r, "--tokens")
    assert not os.path.exists(tmp_path / "r.html")
    bad = tmp_path / "bad"
    shutil.copytree(runs["steering"], bad)
    (bad / "steering.csv").write_text("multiplier,p\n1,2\n")
    one_line_error(script("report.py", str(bad)), "steering.csv", "'layer'")


def test_a_zero_layer_nobody_asked_for_does_not_stop_the_report(runs, tmp_path):
    """A probe trained on every layer of contrast pairs has a zero layer 0 (both sides end in the
    same token): a report about another layer goes on without it, the server's vector reader
    leaves it out, and asking for that very layer is refused in one line."""
    from safetensors.numpy import save_file

    from llama.errors import LlamaError
    from llama.vectors import load_vectors

    folder = tmp_path / "probes"
    folder.mkdir()
    t = load_file(runs["probe"])
    for k in ("w", "w_raw", "direction"):
        t[k][0] = 0.0  # LAYERS[0] learnt nothing
    zero = str(folder / "lr.safetensors")
    save_file(t, zero)
    shutil.copy(runs["probe"][:-len(".safetensors")] + ".json", folder / "lr.json")
    page = str(tmp_path / "r.html")
    for asked in ([], ["--layer", str(LAYERS[1])]):
        r = script("report.py", runs["probes"], "--tokens", runs["cache"], "--direction", zero,
                   *asked, "--output", page)
        assert r.returncode == 0, r.stderr
        assert read_json_blob(open(page, encoding="utf-8").read())["layers"] == [LAYERS[1]]
    assert sorted(load_vectors(zero, None, 16, 2)) == [LAYERS[1]]
    with pytest.raises(LlamaError, match=f"layer {LAYERS[0]} vector is zero"):
        load_vectors(zero, [LAYERS[0]], 16, 2)
    r = script("report.py", runs["probes"], "--tokens", runs["cache"], "--direction", zero,
               "--layer", str(LAYERS[0]), "--output", page)
    one_line_error(r, f"layer {LAYERS[0]} vector is zero")


def test_server_and_heatmap_read_a_probe_alike(runs):
    """One reader of saved probes (llama.vectors.read_probe): the server's read-out of a state
    and the heat-map's score of the same token agree, and so do their thresholds."""
    import torch

    from pages.heatmap import token_map
    from server.main import load_probe

    tm = token_map(runs["cache"], runs["probe"], examples=2)
    cache = ActivationCache(runs["cache"])
    off = cache.offsets("prompt")
    first = int(tm.prompts[0][0][1:])
    for layer in tm.layers:
        probe = load_probe(runs["probe"], layer, 16, 2, "fp-report")
        states = torch.tensor(cache.array(layer, "prompt")[off[first]:off[first + 1]])
        assert np.allclose(probe.score(states), tm.scores[layer][0], rtol=1e-5, atol=1e-4)
        assert probe.threshold == pytest.approx(tm.thresholds[layer], abs=1e-9)


def test_changed_prompt_file_is_refused(runs, tmp_path):
    from llama.errors import LlamaError

    shutil.copy(runs["data"], runs["data"] + ".keep")
    try:
        with open(runs["data"], "a") as f:
            f.write("q40,one more,testing\n")
        with pytest.raises(LlamaError, match="changed since cache"):
            build([runs["probes"]], str(tmp_path / "r.html"), Tokens(runs["cache"], runs["probe"]))
    finally:
        shutil.move(runs["data"] + ".keep", runs["data"])


@pytest.mark.skipif(not available(), reason="needs /usr/bin/chromium and /usr/bin/chromedriver "
                    "(make test installs them)")
def test_report_in_browser(runs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with Browser() as driver:
        driver.get("file://" + runs["page"])
        assert console_errors(driver) == []
        plots = driver.find_elements(By.CSS_SELECTOR, "figure.plot")
        assert len(plots) == 1 + 2 + steering_panels(runs["steering"])
        for p in plots:
            svg = p.find_element(By.TAG_NAME, "svg")
            size = svg.size
            assert size["width"] > 100 and size["height"] > 100, p.get_attribute("data-plot")
        boxes = driver.find_elements(By.CSS_SELECTOR, ".heatmap .prompt")
        for box in boxes:
            toks = box.find_elements(By.CSS_SELECTOR, ".tok")
            assert len(toks) == int(box.get_attribute("data-tokens"))
            colours = driver.execute_script(
                "return Array.from(arguments[0].querySelectorAll('.tok')).map("
                "t => getComputedStyle(t).backgroundColor)", box)
            assert all(c.startswith("rgba(") and not c.endswith(", 0)") for c in colours)
        evil = [b for b in boxes if "alert(1)" in b.text]
        assert len(evil) == 1 and evil[0].text == EVIL
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 2  # the page's own two
        # the colour key: from -scale to +scale of the layer shown, the probe's threshold, and
        # what the probe was trained on
        blob = read_json_blob(runs["html"])
        layer = driver.find_element(By.CSS_SELECTOR, ".heat-layer-shown").text
        key = driver.find_element(By.CSS_SELECTOR, ".heat-key")
        scale = blob["scale"][layer]
        assert key.is_displayed() and shown_numbers(key.text) == pytest.approx(
            [-scale, scale], rel=5e-3)
        assert "above the threshold" in driver.find_element(By.CSS_SELECTOR, ".legend").text
        text = driver.find_element(By.CSS_SELECTOR, ".heat-text").text
        assert text.startswith("The probe was trained on: ")
        assert "prompts.csv, single prompts" in text
        first = driver.find_element(By.CSS_SELECTOR, ".heatmap .tok").get_attribute("title")
        pick = Select(driver.find_element(By.CSS_SELECTOR, "select.heat-layer"))
        other = [o.text for o in pick.options if not o.is_selected()][0]
        pick.select_by_visible_text(other)
        title = driver.find_element(By.CSS_SELECTOR, ".heatmap .tok").get_attribute("title")
        assert title.startswith(f"layer {other},") and title != first
        assert console_errors(driver) == []
        shots = {"report.png": None,
                 "report_tokens.png": driver.find_element(By.CSS_SELECTOR, ".heatmap")}
        for name, element in shots.items():
            path = str(tmp_path / name)
            (element.screenshot(path) if element else driver.save_screenshot(path))
            assert os.path.getsize(path) > 10000
            if os.environ.get("UPDATE_SCREENSHOTS"):
                os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
                shutil.copy(path, os.path.join(ROOT, "docs", name))


def test_transfer_matrix(runs, tmp_path):
    import probes.commands as ccs

    cache = ActivationCache(runs["mean_cache"])
    other = str(tmp_path / "other")
    from activations.cache import save_cache

    keep = np.arange(20)  # another cache of the same model: half the prompts, both classes
    save_cache(other, {l: {"prompt": cache.array(l, "prompt")[keep]} for l in LAYERS},
               {**cache.meta, "ids": [cache.ids[i] for i in keep],
                "types": [cache.types[i] for i in keep],
                "labels": [int(cache.labels[i]) for i in keep]}, token="mean")
    out = str(tmp_path / "transfer")
    r = in_process(["ccs.py", "transfer", "--train", runs["mean_cache"], "--test", other,
                    "--output", out, "--bootstrap", "20", "--methods", "lr,mean_diff",
                    "--report"], ccs.main)
    assert r.returncode == 0, r.stderr
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert 'data-plot="transfer-auroc"' in page and 'data-plot="transfer-accuracy"' in page
    tr = pd.read_csv(os.path.join(out, "transfer.csv"))
    at = tr[(tr.chosen > 0) & (tr.test == other)]
    # each cell is written on the matrix (SVG text), to 3 decimals
    assert shown(at.auroc, " ".join(re.findall(r">([^<>]*)<", page)), 3)


def test_bands_of_the_methods_that_matter():
    """Ten methods' 95% bands merge into one grey block: the report draws those of the methods,
    not of the baselines, the methods without layers or the _signed twins."""
    from pages.plots import banded, probe_layers

    assert all(banded(m) for m in ("ccs", "lr", "lr_concat", "mean_diff", "crc_tpc"))
    assert not any(banded(m) for m in ("ccs_signed", "random", "majority", "zero_shot"))
    rows = [dict(layer=layer, method=m, accuracy=0.7, accuracy_lo=0.6, accuracy_hi=0.8,
                 auroc=0.7, auroc_lo=0.6, auroc_hi=0.8, chosen=int(layer == 1))
            for m in ("lr", "random") for layer in (0, 1, 2)]
    svg = probe_layers(pd.DataFrame(rows), "t")
    # one band (a filled PolyCollection) per panel: lr's, not random's
    assert svg.count('id="FillBetweenPolyCollection_') == 2
