"""The report page (report.html) written beside every compile, eval and simulate report.

Reports come from the bundled sample: compiled for seneca at 50% and for ort at 30%, the
seneca compile simulated on a few tokens, and evaluated alone and side by side. The page is
then loaded in a real headless Chromium: no console errors, every figure present and drawn.
Set SPARSECC_UPDATE_DOCS=1 to also write the simulate page's screenshot to docs/report-page.png.
"""
from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE, SAMPLE_MODEL, TEST_TXT, VALID_TXT, mlp_model, save

from sparsecc import cli, report_page
from sparsecc.backends.seneca.target import builtin, load_target

ENERGY = {"energy-by-category", "energy-by-layer", "energy-by-core", "latency", "mesh"}
ALL = set(report_page.FIGURES) - {"training"}   # drawn only for a compile that distilled (tests/test_distill.py)
# report kind -> the figures drawn (the others are left out with a note)
DRAWN = {
    "compile": {"sparsity-by-layer", "macs"},
    "eval": {"sparsity-by-layer", "macs"},
    "eval-sweep": {"curve", "sparsity-by-layer", "macs"},
    "simulation": ALL - {"curve"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Output folders of the sample's compile (seneca, ort), simulate and eval (one, two models)."""
    root = tmp_path_factory.mktemp("report_page")
    cache = ["--cache-dir", str(root / "cache")]
    data = ["--calib", str(VALID_TXT), "--tokenizer", str(SAMPLE), "--windows", "4", "--seq-len", "32"]
    folders = {"compile": root / "seneca50", "ort": root / "ort30", "eval": root / "eval", "sweep": root / "sweep"}
    assert cli.main(["-q", "compile", str(SAMPLE_MODEL), "--sparsity", "0.5", *data, *cache, "--target", "seneca",
                     "-o", str(folders["compile"])]) == 0
    assert cli.main(["-q", "compile", str(SAMPLE_MODEL), "--sparsity", "0.3", *data, *cache,
                     "-o", str(folders["ort"])]) == 0
    assert cli.main(["-q", "simulate", str(folders["compile"]), "--text", str(TEST_TXT), "--tokens", "6"]) == 0
    folders["simulate"] = folders["compile"] / "simulation"
    evaluate = ["--ppl", str(TEST_TXT), "--windows", "2", "--seq-len", "32"]
    assert cli.main(["-q", "eval", str(folders["compile"] / "model.onnx"), *evaluate, "-o", str(folders["eval"])]) == 0
    assert cli.main(["-q", "eval", str(folders["ort"] / "model.onnx"), str(folders["compile"] / "model.onnx"),
                     *evaluate, "-o", str(folders["sweep"])]) == 0
    return folders


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text(encoding="utf-8"))


def _page_figures(page: str) -> tuple[set[str], set[str]]:
    """(figures drawn, figures left out) as the page marks them."""
    drawn = set(re.findall(r'<figure class="plot" id="fig-[^"]+" data-figure="([^"]+)"', page))
    return drawn, set(re.findall(r'data-omitted="([^"]+)"', page))


@pytest.mark.parametrize("name, kind", [("compile", "compile"), ("ort", "compile"), ("eval", "eval"),
                                        ("sweep", "eval-sweep"), ("simulate", "simulation")])
def test_every_report_has_its_page_with_the_figures_its_data_allows(runs, name, kind):
    folder = runs[name]
    report = _report(folder)
    assert report_page.kind(report) == kind
    page = (folder / "report.html").read_text(encoding="utf-8")
    drawn, omitted = _page_figures(page)
    assert drawn == DRAWN[kind] and omitted == ALL - DRAWN[kind]
    # each figure is an inline SVG with drawn marks, and each left-out one says why
    for key in drawn:
        svg = re.search(rf'id="fig-{key}" data-figure="{key}">.*?(<svg.*?</svg>)', page, re.S).group(1)
        assert svg.count("<path") > 5, key
    for key in omitted:
        assert re.search(rf'data-omitted="{key}"><b>[^<]+</b>: \S.{{10,}}</li>', page), key
    # self-contained: nothing fetched from anywhere
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page
    if kind == "compile":
        assert "report.html" in report["outputs"]


@pytest.mark.parametrize("name", ["compile", "eval", "sweep", "simulate"])
def test_page_is_byte_identical_and_a_function_of_the_report_alone(runs, name):
    folder = runs[name]
    written = (folder / "report.html").read_text(encoding="utf-8")   # rendered by the command, from its dict
    assert report_page.render(_report(folder)) == written
    ids = re.findall(r'\bid="([^"]+)"', written)
    assert len(ids) == len(set(ids)), "inline SVGs must not share ids"
    # a different report gives a different page (the figures follow the data)
    changed = _report(folder)
    if name == "simulate":
        changed["sparse"]["energy_pj_per_token"]["npe"] *= 2
    elif name == "compile":
        changed["passes"][2]["details"]["thresholds"][0]["calibrated_sparsity"] = 0.9
    elif name == "eval":
        changed["result"]["sites"][0]["sparsity"] = 0.9
    else:
        changed["runs"][0]["result"]["macs"]["body"]["sparsity"] = 0.9
    assert report_page.render(changed) != written


def test_page_size_stays_small(runs):
    sizes = {name: (runs[name] / "report.html").stat().st_size for name in ("compile", "eval", "sweep", "simulate")}
    assert all(20_000 < size < 400_000 for size in sizes.values()), sizes


def test_sites_carry_their_layer_in_compile_and_eval_reports(runs):
    """The sample has 4 Llama layers of 7 sites (q, k, v, o, gate, up, down) and a head."""
    compiled = _report(runs["compile"])["sites"]
    measured = _report(runs["eval"])["result"]["sites"]
    expected = [layer for layer in range(4) for _ in range(7)] + [None]
    assert [s["layer"] for s in compiled] == expected
    assert [s["layer"] for s in measured] == expected
    assert compiled[-1]["head"] and measured[-1]["head"]


def test_eval_of_several_models_compares_them(runs):
    report = _report(runs["sweep"])
    assert report["kind"] == "eval-sweep" and report["schema"] == "sparsecc.report/1"
    models = [r["model"] for r in report["runs"]]
    assert models == [str(runs["ort"] / "model.onnx"), str(runs["compile"] / "model.onnx")]
    # each run is a full eval report, the same as evaluating that model alone
    alone = _report(runs["eval"])
    assert report["runs"][1]["result"] == alone["result"]
    sparsity = [r["result"]["macs"]["body"]["sparsity"] for r in report["runs"]]
    assert 0.25 < sparsity[0] < 0.35 and 0.45 < sparsity[1] < 0.55
    markdown = (runs["sweep"] / "report.md").read_text(encoding="utf-8")
    assert all(m in markdown for m in models) and markdown.count("## sparsecc eval:") == 2
    assert markdown.count("| calibrate-thresholds |") == 2 and markdown.count("Method: calibrate-thresholds") == 2
    # the curve has one labelled point per model
    page = (runs["sweep"] / "report.html").read_text(encoding="utf-8")
    curve = re.search(r'id="fig-curve".*?</svg>', page, re.S).group(0)
    assert ">ort30<" in curve and ">seneca50<" in curve


def test_simulation_reports_traffic_and_cycles_per_core_and_layer(runs):
    report = _report(runs["simulate"])
    target = load_target(builtin()["seneca"])
    for part in ("sparse", "dense"):
        s = report[part]
        assert s["mesh"] == {"rows": target["mesh"]["rows"], "cols": target["mesh"]["cols"]}
        flits = s["flits_per_core"]
        assert sum(row["sent"] for row in flits.values()) == s["flits"] > 0
        assert sum(row["received"] for row in flits.values()) >= s["flits"]   # a multicast reaches 1+ cores
        assert set(flits) <= set(s["per_core"])
        by_layer = sum(row["cycles"] for row in s["per_layer"].values())
        by_core = sum(row["cycles"] for row in s["per_core"].values())
        assert by_layer == pytest.approx(by_core, rel=1e-6)
    assert report["dense"]["flits"] > report["sparse"]["flits"]


def test_figures_without_data_are_left_out_with_the_reason(runs, tmp_path):
    sim = _report(runs["simulate"])
    keys = lambda figs: {f.key for f in figs if f.draw is not None}   # noqa: E731
    # a simulation report from before per-site sparsity was recorded: no sparsity per site to show
    old = copy.deepcopy(sim)
    del old["sites"]
    figs = report_page.figures(old)
    assert keys(figs) == DRAWN["simulation"] - {"sparsity-by-layer"}
    assert "no per-site sparsity" in next(f.note for f in figs if f.key == "sparsity-by-layer")
    # no per-core figures: no mesh; no traffic per core: the mesh shows the load and says so
    bare = copy.deepcopy(sim)
    bare["sparse"]["per_core"] = {}
    assert "mesh" not in keys(report_page.figures(bare))
    old = copy.deepcopy(sim)
    del old["sparse"]["flits_per_core"]
    mesh = next(f for f in report_page.figures(old) if f.key == "mesh")
    assert mesh.draw is not None and "no per-core NoC traffic" in mesh.caption
    # models without perplexity or reference: no curve
    sweep = _report(runs["sweep"])
    for run in sweep["runs"]:
        del run["result"]["perplexity"], run["result"]["output_error"]
    assert "curve" not in keys(report_page.figures(sweep))
    # a compile that set no thresholds has no sparsity to draw (weights quantized only: a compile
    # that changes nothing is refused)
    model = save(mlp_model(), tmp_path / "mlp.onnx")
    assert cli.main(["-q", "compile", str(model), "--quant", "w8", "-o", str(tmp_path / "dense")]) == 0
    figs = report_page.figures(_report(tmp_path / "dense"))
    assert keys(figs) == set()
    assert "no thresholds" in next(f.note for f in figs if f.key == "sparsity-by-layer")
    assert _page_figures((tmp_path / "dense" / "report.html").read_text())[1] == ALL


# What the figures draw -------------------------------------------------------------------------
def _laid_out(fig: report_page.Figure):
    """A page figure drawn and laid out as on the page (Agg: the positions of what it draws)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    with matplotlib.rc_context(report_page.RC):
        canvas = report_page.drawn(fig)
        FigureCanvasAgg(canvas).draw()
    return canvas


def _figure(report: dict, key: str) -> report_page.Figure:
    return next(f for f in report_page.figures(report) if f.key == key)


def test_simulate_page_plots_the_sparsity_the_simulation_measured(runs):
    from sparsecc import compiler, model_io
    from sparsecc.runtime import ort_session

    sim = _report(runs["simulate"])
    fig = _laid_out(_figure(sim, "sparsity-by-layer"))
    ax = fig.axes[0]
    assert ax.get_ylabel() == "simulated sparsity"
    heights = sorted(p.get_height() for p in ax.patches)
    assert heights == pytest.approx(sorted(s["sparsity"] for s in sim["sites"]), abs=1e-9)
    # the simulated sparsity is ORT's on the same tokens (up to near-ties and 16-bit rounding) ...
    model = model_io.load_model(runs["compile"] / "model.onnx")
    consumes = {s["site"]: s["tensor"] for s in _report(runs["eval"])["result"]["sites"]}
    source = compiler.data_source(TEST_TXT, SAMPLE, 6, 1)
    tensors = sorted(set(consumes.values()))
    with ort_session(model, tensors) as session:
        feed = next(iter(source.feeds([i.name for i in session.get_inputs()])))
        acts = dict(zip(tensors, session.run(tensors, feed)))
    for s in sim["sites"]:
        x = acts[consumes[s["site"]]]
        assert s["sparsity"] == pytest.approx(1 - np.count_nonzero(x) / x.size, abs=0.01), s["label"]
    # ... and not what was calibrated (what the page used to plot)
    calibrated = {r["label"]: r["calibrated_sparsity"] for r in _report(runs["compile"])["passes"][2]["details"]["thresholds"]}
    by_threshold = [(s["sparsity"], calibrated[s["label"].rsplit(" ", 1)[0] + " " + group])
                    for s in sim["sites"] for group in ("q/k/v", "o", "gate/up", "down")
                    if s["label"].rsplit(" ", 1)[0] + " " + group in calibrated and s["label"].split()[-1] in group.split("/")]
    assert len(by_threshold) == 28 and max(abs(a - b) for a, b in by_threshold) > 0.02


def test_simulate_page_shows_agreement_with_own_and_with_ort_decisions(runs):
    sim = _report(runs["simulate"])
    page = (runs["simulate"] / "report.html").read_text(encoding="utf-8")
    own, pinned = sim["vs_ort"]["argmax_agreement"], sim["vs_ort"]["with_ort_decisions"]["argmax_agreement"]
    facts = re.search(r"<th>argmax agreement with ONNX Runtime</th><td>([^<]+)</td>", page).group(1)
    assert facts.startswith(f"{own:.1%} with the simulator&#x27;s own threshold and quantizer decisions, "
                            f"{pinned:.1%} with ORT&#x27;s decisions")


def test_heat_map_colour_scales_start_at_zero(runs):
    sim = _report(runs["simulate"])
    per_core = sim["sparse"]["per_core"]
    for i, core in enumerate(sorted(per_core, key=int)):   # a 10% spread of load over the cores
        per_core[core]["cycles"] = 1000.0 + 10.0 * i
    fig = _laid_out(_figure(sim, "mesh"))
    meshes = [c for ax in fig.axes if ax.get_title() for c in ax.collections   # the panels, not their colour bars
              if c.__class__.__name__ == "QuadMesh"]
    assert len(meshes) == 3
    for mesh in meshes:
        assert mesh.norm.vmin == 0 and mesh.norm.vmax == pytest.approx(float(np.nanmax(mesh.get_array())))
    assert meshes[0].norm.vmax == pytest.approx(1000.0 + 10.0 * (len(per_core) - 1))


def _curve_lines(report: dict) -> list:
    ax = _laid_out(_figure(report, "curve")).axes[0]
    return [line for line in ax.lines if line.get_marker() == "o"]


def test_sweep_curve_draws_one_line_per_method(runs):
    sweep = _report(runs["sweep"])
    # the method comes from each model's config.yaml: both compiled by calibrate-thresholds (partition is the target's)
    assert [r["method"] for r in sweep["runs"]] == ["calibrate-thresholds", "calibrate-thresholds"]
    (line,) = _curve_lines(sweep)
    assert list(line.get_xdata()) == sorted(r["result"]["macs"]["body"]["sparsity"] for r in sweep["runs"])
    # two methods at two sparsities each: two lines, each in order of sparsity, named in the legend
    mixed = copy.deepcopy(sweep)
    mixed["runs"] = [copy.deepcopy(r) for r in sweep["runs"] * 2]
    for run, method, sparsity in zip(mixed["runs"], ("A", "B", "B", "A"), (0.5, 0.3, 0.5, 0.3)):
        run["method"], run["result"]["macs"]["body"]["sparsity"] = method, sparsity
    lines = _curve_lines(mixed)
    assert [(line.get_label(), list(line.get_xdata())) for line in lines] == [("B", [0.3, 0.5]), ("A", [0.3, 0.5])]
    legend = _laid_out(_figure(mixed, "curve")).axes[-1].get_legend()
    assert [t.get_text() for t in legend.get_texts()][:2] == ["B", "A"]


def test_a_models_method_is_the_passes_that_compiled_it(tmp_path):
    from sparsecc import compiler, pipeline

    def spec(**options):
        return pipeline.to_spec(pipeline.default_pipeline(**options))

    assert compiler.method(spec()) == "calibrate-thresholds"
    assert compiler.method(spec(weight_scores=True, finetune_steps=3, quant="w8a8")) == (
        "quantize-weights + weight-scores + calibrate-thresholds + finetune-bands + quantize-activations")
    assert compiler.method(spec(thresholds=False)) == "no thresholds"
    assert compiler.method({}) == "not compiled by sparsecc"   # no config.yaml beside the model


@pytest.mark.parametrize("name", ["compile", "eval", "sweep", "simulate"])
def test_legends_sit_beside_the_axes_never_over_them(runs, name):
    from matplotlib.transforms import Bbox

    report = _report(runs[name])
    legends = 0
    for fig in report_page.figures(report):
        if fig.draw is None:
            continue
        drawn = _laid_out(fig)
        page = drawn.bbox
        for ax in drawn.axes:
            legend = ax.get_legend()
            if legend is None:
                continue
            legends += 1
            box = legend.get_window_extent()
            assert page.x0 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 <= box.y0 and box.y1 <= page.y1 + 1, fig.key
            for other in drawn.axes:
                overlap = Bbox.intersection(box, other.get_window_extent())
                assert overlap is None or overlap.width * overlap.height < 1, (fig.key, box, other.get_window_extent())
    assert legends >= {"compile": 2, "eval": 2, "sweep": 3, "simulate": 5}[name]


def test_site_bars_are_named_by_role(runs):
    for name in ("compile", "eval", "simulate"):
        legend = _laid_out(_figure(_report(runs[name]), "sparsity-by-layer")).axes[0].get_legend()
        assert [t.get_text() for t in legend.get_texts()] == ["q", "k", "v", "o", "gate", "up", "down"], name


# The page in a real browser ------------------------------------------------------------------
def _browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail('selenium is missing: pip install -e ".[test]"')
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("this test needs Debian's headless Chromium and its driver: "
                    "apt-get install -y chromium chromium-driver")
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def _severe(browser) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_pages_load_in_headless_chromium_without_errors_and_draw_every_figure(runs, tmp_path):
    from selenium.webdriver.common.by import By

    browser = _browser()
    try:
        # the harness sees console errors: a page that throws one is caught
        broken = tmp_path / "broken.html"
        broken.write_text("<!DOCTYPE html><html><body><script>throw new Error('on purpose')</script></body></html>")
        browser.get(broken.as_uri())
        assert any("on purpose" in entry["message"] for entry in _severe(browser))
        for name, kind in (("simulate", "simulation"), ("sweep", "eval-sweep"), ("compile", "compile")):
            browser.get((runs[name] / "report.html").as_uri())
            assert _severe(browser) == [], name
            for key in DRAWN[kind]:
                svg = browser.find_element(By.CSS_SELECTOR, f"figure#fig-{key} > svg")
                assert svg.is_displayed() and svg.size["width"] > 300 and svg.size["height"] > 100, (name, key)
                # something drawn inside: the bounding box of its marks, and how many there are
                width, height, marks = browser.execute_script(
                    "const s = arguments[0], b = s.getBBox();"
                    "return [b.width, b.height, s.querySelectorAll('path, use, text').length];", svg)
                assert width > 100 and height > 50 and marks > 20, (name, key)
            shown = {e.get_attribute("data-omitted") for e in browser.find_elements(By.CSS_SELECTOR, "[data-omitted]")}
            assert shown == ALL - DRAWN[kind], name
            if name == "simulate":
                shot = _full_page_png(browser)
                assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 50_000
                (tmp_path / "report-page.png").write_bytes(shot)
                if os.environ.get("SPARSECC_UPDATE_DOCS"):
                    (REPO / "docs").mkdir(exist_ok=True)
                    (REPO / "docs" / "report-page.png").write_bytes(shot)
    finally:
        browser.quit()


def _full_page_png(browser) -> bytes:
    width, height = browser.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    return base64.b64decode(shot["data"])
