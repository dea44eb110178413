"""The shipped workflows in the real graph editor (ComfyUI's own frontend, in headless Chromium), used as an artist
uses them: open the file, pick the checkpoint and the clip in their widgets (and the small step counts and resize
target the e2e suite runs at), press Queue. ``app.loadGraphData`` and ``app.queuePrompt(0, 1)`` are what opening a
file and the Queue button call; the widgets are set on the graph's nodes, so the API prompt is the one the frontend
builds. Each run must reach the end with the workflow's frame count at its resized size, and the pack's frontend
extension must show the consistency summary on its node."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tve.tests.e2e.session_files import PHONE, WEB, SourceVideo
from tve.tests.e2e.test_workflows import (TYPE_OVERRIDES, WORKFLOW_FILES, assert_ran_to_the_end, load,
                                          with_overrides)
from tve.tests.e2e.ui_workflow import to_api

pytestmark = pytest.mark.real_host

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_NEEDED = "graph editor test needs Chromium and Playwright"       # .ci/run fails on this skip
EXTENSION = "TextVideoEdit.ConsistencyMetrics"                          # web/consistency_metrics.js
START_TIMEOUT_MS = 120_000
SUMMARY_TIMEOUT_MS = 30_000

# What an artist does in the editor: pick a value offered by each widget (a combo must list it), as the widget's own
# callback sees it. Fails on a node of a named type without that widget.
SET_WIDGETS = """(settings) => {
  for (const node of window.app.graph.nodes) {
    for (const [name, value] of Object.entries(settings[node.type] ?? {})) {
      const widget = node.widgets?.find((w) => w.name === name);
      if (!widget) throw new Error(`${node.type} #${node.id} has no widget ${name}`);
      if (widget.type === "combo") {
        const values = widget.options.values;
        const offered = typeof values === "function" ? values() : values;
        if (!offered.includes(value)) throw new Error(`${node.type}.${name} does not offer ${value}: ${offered}`);
      }
      widget.value = value;
      widget.callback?.(widget.value, window.app.canvas, node);
    }
  }
  window.app.graph.setDirtyCanvas(true, true);
}"""

# The graph as the editor holds it after loading: what saving it would write, each group's nodes by the frontend's
# rule, and each node's drawn rectangle (title bar included) and the size its widgets need.
GRAPH_STATE = """() => {
  const graph = window.app.graph;
  const groups = graph.groups.map((g) => {
    g.recomputeInsideNodes();
    return [g.title, [...g.nodes].map((n) => n.id)];
  });
  const boxes = graph.nodes.map((n) => ({id: n.id, rect: [...n.boundingRect], size: [...n.size],
                                         needs: [...n.computeSize()]}));
  return {saved: graph.serialize(), groups: groups, boxes: boxes};
}"""
KEPT = ("type", "pos", "size", "flags", "mode", "title", "properties", "widgets_values")   # what an artist sees


def changed_on_load(workflow: dict, saved: dict) -> list[str]:
    """What the editor changed of a file it loaded, as its Save would write it: the links, the groups, each node's
    place, size, title, widget values and linked inputs (the frontend adds its own bookkeeping, left out here)."""
    changes = [f"{key} differ" for key in ("links", "groups") if workflow[key] != saved[key]]
    held = {node["id"]: node for node in saved["nodes"]}
    if sorted(held) != sorted(node["id"] for node in workflow["nodes"]):
        return changes + [f"nodes {sorted(held)}"]
    for node in workflow["nodes"]:
        kept = held[node["id"]]
        changes += [f"node {node['id']} {key}: {node.get(key)!r} -> {kept.get(key)!r}" for key in KEPT
                    if node.get(key) != kept.get(key)]
        links = [{entry["name"]: entry["link"] for entry in n.get("inputs", []) if entry.get("link") is not None}
                 for n in (node, kept)]
        changes += [f"node {node['id']} linked inputs: {links[0]} -> {links[1]}"] if links[0] != links[1] else []
    return changes


def layout_problems(boxes: list[dict]) -> list[str]:
    """Nodes drawn smaller than their widgets need, and nodes drawn over one another."""
    found = [f"node {b['id']} is {b['size']}, its widgets need {b['needs']}" for b in boxes
             if any(need > have + 0.5 for need, have in zip(b["needs"], b["size"]))]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["rect"], b["rect"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                found.append(f"nodes {a['id']} and {b['id']} overlap: {a['rect']}, {b['rect']}")
    return found


SUMMARY = """(id) => window.app.graph.getNodeById(id).widgets?.find((w) => w.name === "tve_summary")?.value ?? null"""


@dataclass
class Editor:
    page: object                                     # playwright.sync_api.Page with the frontend loaded
    errors: list[str] = field(default_factory=list)  # uncaught exceptions in the page

    def open(self, workflow: dict) -> dict:
        self.page.evaluate("(w) => window.app.loadGraphData(w)", workflow)
        return self.page.evaluate(GRAPH_STATE)

    def queue(self) -> dict:
        """Press Queue; returns the body the frontend posted to /prompt (its ``prompt`` and the server's id)."""
        with self.page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/prompt")) as posted:
            self.page.evaluate("() => window.app.queuePrompt(0, 1)")
        response = posted.value.response()
        assert response.ok, f"POST /prompt refused the editor's graph ({response.status}): {response.text()}"
        return {**posted.value.post_data_json, "prompt_id": response.json()["prompt_id"]}


@pytest.fixture(scope="module")
def editor(comfyui) -> Editor:
    """One browser tab on the session's server, the pack's extension registered (as an artist keeps one open)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(f"{BROWSER_NEEDED}: Playwright is missing (pip install '.[test]')")
    if CHROMIUM is None:
        pytest.skip(f"{BROWSER_NEEDED}: no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        page.set_default_timeout(START_TIMEOUT_MS)
        page.goto(comfyui.url)
        page.wait_for_function(f"() => window.app?.extensions?.some((e) => e.name === {json.dumps(EXTENSION)})")
        editor = Editor(page)                        # errors from here on: the frontend's start-up is not ours
        page.on("pageerror", lambda error: editor.errors.append(f"{error}\n{error.stack}"))
        yield editor
        browser.close()


def runs() -> list:
    """Every workflow that reads a video on the 426x240 clip with audio and on the 854x480 one (ordinary 16:9
    footage, neither a multiple of 8 on both sides); one that reads none once."""
    def reads_video(path: Path) -> bool:
        return "LoadVideo" in path.read_text(encoding="utf-8")

    def name(path: Path, source: SourceVideo) -> str:
        return f"{path.name}-{source.width}x{source.height}" if reads_video(path) else path.name

    return [pytest.param(path, source, id=name(path, source)) for path in WORKFLOW_FILES for source in (WEB, PHONE)
            if source is WEB or reads_video(path)]


def declared(node: dict, object_info: dict) -> dict:
    """A posted node's inputs that its class declares: the server ignores the rest, such as the value of the
    ``video-preview`` widget the frontend adds to LoadVideo once its preview has loaded (a race: sometimes posted)."""
    spec = object_info[node["class_type"]]["input"]
    names = {*spec.get("required", {}), *spec.get("optional", {})}
    return {name: value for name, value in node["inputs"].items() if name in names}


@pytest.mark.parametrize("path, source", runs())
def test_workflow_queued_in_the_graph_editor_runs_to_the_end_with_its_frame_count_at_its_size(
        path, source, editor, comfyui, object_info):
    workflow = load(path)
    editor.errors.clear()
    held = editor.open(workflow)
    assert changed_on_load(workflow, held["saved"]) == []
    assert layout_problems(held["boxes"]) == []
    grouped = [node_id for _, nodes in held["groups"] for node_id in nodes]
    assert sorted(grouped) == sorted(node["id"] for node in workflow["nodes"]), f"one group each: {held['groups']}"

    editor.page.evaluate(SET_WIDGETS, {**TYPE_OVERRIDES, "LoadVideo": {"file": source.file}})
    posted = editor.queue()
    graph = posted["prompt"]
    expected = with_overrides(to_api(workflow, object_info), source)
    assert {node_id: (node["class_type"], declared(node, object_info)) for node_id, node in graph.items()} == {
        node_id: (node["class_type"], node["inputs"]) for node_id, node in expected.items()}, \
        "the editor queued another graph than the file and the changed widgets describe"

    entry = comfyui.wait(posted["prompt_id"])
    assert_ran_to_the_end(comfyui, object_info, path, graph, entry, source)
    for node_id, node in graph.items():               # web/consistency_metrics.js puts the summary on the node
        if node["class_type"] == "TVE_ConsistencyMetrics":
            shown = "\n".join(entry["outputs"][node_id]["text"])
            editor.page.wait_for_function(f"(id) => ({SUMMARY})(id) === {json.dumps(shown)}", arg=int(node_id),
                                          timeout=SUMMARY_TIMEOUT_MS)
    assert not editor.errors, "\n".join(editor.errors)
