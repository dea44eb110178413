"""The shipped workflows in the real graph editor (the frontend of the ComfyUI release under test, in headless
Chromium), used as an artist uses them: open the file, see what to set first, pick the checkpoint and the clip in
their widgets (and the small step counts and resize target the e2e suite runs at), press Queue.
``app.loadGraphData`` and ``app.queuePrompt(0, 1)`` are what opening a file and the Queue button call; the widgets
are set on the graph's nodes, so the API prompt is the one the frontend builds. Each run must reach the end with
the workflow's frame count at its resized size, and the pack's frontend extension must show the consistency
summary on its node.

Console rule. The page's console warnings and errors and its uncaught exceptions are collected from the page load
on: during start-up, while a workflow opens, while it is queued and runs, until the summary shows. A message fails
the test unless it is frontend noise unrelated to the pack, which is decided like this:

1. A message that names the pack (its web folder ``/extensions/<pack>/``, a ``TVE_`` node type, "(TVE)", the
   extension's name "TextVideoEdit") in its text, source URL or stack is the pack's, always.
2. Any other message is excused only if it matches an entry of ``KNOWN_NOISE`` (a pattern with the reason the
   frontend prints it) that ALSO matched a message of the baseline page: a second tab on the same server with the
   pack hidden (its node types taken out of /object_info, its web files out of /extensions) that starts up, opens
   a core-only workflow naming the same kind of missing files (a checkpoint with a download URL, a clip the input
   folder lacks) and runs it. An entry the baseline did not reproduce excuses nothing, so the list cannot hide a
   message the pack brings; every baseline message must match an entry (the list describes the frontend at hand).
3. Everything else (a deprecation warning about an API the extension uses, an exception in a callback, a message
   the frontend prints only for the pack's nodes or workflows) fails.

Each run's page runs at 1920×960 (a 1080p screen less the browser's own bars); the numbered nodes (what the short
Note says to set first) and that Note must be in view and not covered by the editor's panels when the file opens.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tve.tests.e2e.session_files import CHECKPOINT, PACK_FOLDER, PHONE, WEB, SourceVideo
from tve.tests.e2e.test_workflows import (TYPE_OVERRIDES, WORKFLOW_FILES, assert_ran_to_the_end, load,
                                          with_overrides)
from tve.tests.e2e.ui_workflow import DYNAMIC_COMBO, filled_values, kind, layout, to_api

pytestmark = pytest.mark.real_host

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_NEEDED = "graph editor test needs Chromium and Playwright"       # .ci/run fails on this skip
EXTENSION = "TextVideoEdit.ConsistencyMetrics"                          # web/consistency_metrics.js
VIEWPORT = {"width": 1920, "height": 960}
NUMBERED = re.compile(r"^[①②③④⑤]")                                       # what the short Note says to set first
PACK_MARKS = (f"/extensions/{PACK_FOLDER}/", PACK_FOLDER, "TVE_", "(TVE)", "TextVideoEdit")


@dataclass(frozen=True)
class Noise:
    """Console output of the frontend itself, matched against ``kind: text @ url``."""
    pattern: str
    why: str

    def matches(self, message: "Message") -> bool:
        return re.search(self.pattern, message.key) is not None


KNOWN_NOISE = (
    Noise(r"^error: Failed to load resource: the server responded with a status of 404 \(Not Found\) @ "
          r"http://[^/]+/(api/)?(userdata/(user\.css|comfy\.templates\.json)|user\.css|favicon\.ico|"
          r"userdata\?dir=(workflows|subgraphs))",
          "start-up: the frontend asks for an artist's own files (user.css, saved workflows and subgraphs, "
          "template settings) that a fresh user folder does not have"),
    Noise(r"^error: ComfyApp graph accessed before initialization @ ",
          "start-up, frontend 1.48: its own code reads the graph before creating it"),
    Noise(r"^warning: \[ComfyUI\] The legacy queue/history menu is deprecated\.",
          "start-up, frontend 1.48: the server's default menu setting"),
    Noise(r"^warning: \[MaskEditor\] ComfyApp\.open_maskeditor is deprecated\.",
          "start-up, frontend 1.48: its own mask editor"),
    Noise(r"^pageerror: Cannot read properties of undefined \(reading 'id'\) @ ",
          "start-up, frontend 1.27: an exception in its own start-up code"),
    Noise(r"^error: Failed to load resource: the server responded with a status of 404 \(Not Found\) @ "
          r"http://[^/]+/(api/)?view\?\S*\btype=input\b",
          "a workflow opens naming an input file (its clip) that the input folder lacks: the frontend's preview"),
    Noise(r"^error: (Failed to load resource: net::ERR_NAME_NOT_RESOLVED @ https://|Error fetching file size: "
          r"TypeError: Failed to fetch)",
          "frontend 1.27, offline: the missing-model dialog asks the model's URL for its size"),
    Noise(r"^error: (Connecting to 'https://[^']+' violates the following Content Security Policy directive|"
          r"Fetch API cannot load https://\S+ Refused to connect because it violates the document's Content "
          r"Security Policy)",
          "frontend 1.48: its missing-model check asks the model's URL for its size; the server's Content "
          "Security Policy refuses connections to other hosts"),
)


@dataclass(frozen=True)
class Message:
    kind: str               # "warning", "error" or "pageerror"
    text: str
    url: str
    stack: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}: {self.text} @ {self.url}"

    def is_the_packs(self) -> bool:
        return any(mark in part for mark in PACK_MARKS for part in (self.text, self.url, self.stack))


def unexcused(messages: list[Message], baseline: list[Message]) -> list[str]:
    """The messages the console rule (module docstring) does not excuse."""
    reproduced = [noise for noise in KNOWN_NOISE if any(noise.matches(m) for m in baseline)]
    return [f"{m.key}\n{m.stack}".rstrip() for m in messages
            if m.is_the_packs() or not any(noise.matches(m) for noise in reproduced)]


class Console:
    """A page's console warnings and errors and uncaught exceptions, and a count of everything the page does
    (requests, websocket frames, console output): the page's progress while a wait polls."""

    def __init__(self, page):
        self.messages: list[Message] = []
        self.activity = 0
        page.on("console", self._console)
        page.on("pageerror", lambda error: self._add(Message("pageerror", error.message, "", error.stack or "")))
        page.on("requestfinished", self._tick)
        page.on("requestfailed", self._tick)
        page.on("websocket", lambda ws: ws.on("framereceived", self._tick))

    def _tick(self, *_) -> None:
        self.activity += 1

    def _add(self, message: Message) -> None:
        self.activity += 1
        self.messages.append(message)

    def _console(self, message) -> None:
        self.activity += 1
        if message.type in ("warning", "error"):
            self._add(Message(message.type, message.text, message.location.get("url", "")))

    def take(self) -> list[Message]:
        taken, self.messages = self.messages, []
        return taken


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
KEPT = ("type", "pos", "flags", "mode", "title", "properties")      # what an artist sees, besides size and values
GROUP_KEPT = {"title": None, "bounding": None, "color": None, "font_size": 24}    # None: no default

# Which of the given nodes the artist sees where the file opens: for each, whether points inside it (its title bar,
# its middle, its corners) are drawn by the canvas or by that node's own widgets, not covered by the editor's
# panels or off screen.
IN_VIEW = """(ids) => {
  const canvas = window.app.canvas, rect = canvas.canvas.getBoundingClientRect(), ds = canvas.ds;
  return ids.map((id) => {
    const node = window.app.graph.getNodeById(id);
    const [x, y, w, h] = node.boundingRect;
    const points = [[x + 10, y + 10], [x + w - 10, y + 10], [x + w / 2, y + h / 2], [x + 10, y + h - 10],
                    [x + w - 10, y + h - 10]];
    const own = (hit) => hit === canvas.canvas ||         // the canvas, or a DOM widget of the node (or its frame)
      (node.widgets ?? []).some((w) => w.element && (w.element.contains(hit) || hit.contains(w.element)));
    const hidden = [];
    for (const [px, py] of points) {
      const hit = document.elementFromPoint(rect.left + (px + ds.offset[0]) * ds.scale,
                                            rect.top + (py + ds.offset[1]) * ds.scale);
      if (!hit || !own(hit)) hidden.push([px, py, hit ? `${hit.tagName}.${[...hit.classList].join(".")}` : "off screen"]);
    }
    return [id, node.title, hidden];
  });
}"""

# A Markdown note's rendered text against its box (the note scrolled into view so the frontend draws it).
NOTE_FIT = """async (id) => {
  const canvas = window.app.canvas, node = window.app.graph.getNodeById(id);
  canvas.ds.offset = [200 - node.pos[0], 200 - node.pos[1]];
  canvas.setDirty(true, true);
  canvas.draw(true, true);
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  const element = node.widgets[0].element;
  const box = element.getBoundingClientRect();
  const blocks = [...element.querySelectorAll("p, li, h1, h2, h3, h4, pre, table")];
  if (!blocks.length || !box.height) return null;
  return [node.title, Math.max(...blocks.map((b) => b.getBoundingClientRect().bottom)) - box.top, box.height];
}"""


def changed_on_load(workflow: dict, saved: dict, object_info: dict) -> list[str]:
    """What the editor changed of a file it loaded, as its Save would write it: the links, the groups, each node's
    place, title, widget values, linked inputs and size. Allowed, as the frontend of a newer release does it: values
    for trailing optional widgets the node gained after the file's release, at their defaults; a node drawn larger
    to fit what it gained (an output, a widget); a node with a V3 dynamic combo set to the height its widgets need
    (frontend 1.48 does so whenever the combo's value is set, loading included); group keys left out at their
    defaults."""
    def group(g: dict) -> dict:
        return {key: g.get(key, default) for key, default in GROUP_KEPT.items()}
    changes = ["links differ"] if workflow["links"] != saved["links"] else []
    if [group(g) for g in workflow["groups"]] != [group(g) for g in saved["groups"]]:
        changes.append(f"groups {workflow['groups']} -> {saved['groups']}")
    held = {node["id"]: node for node in saved["nodes"]}
    if sorted(held) != sorted(node["id"] for node in workflow["nodes"]):
        return changes + [f"nodes {sorted(held)}"]
    for node in workflow["nodes"]:
        kept = held[node["id"]]
        changes += [f"node {node['id']} {key}: {node.get(key)!r} -> {kept.get(key)!r}" for key in KEPT
                    if node.get(key) != kept.get(key)]
        values, resized = node.get("widgets_values", []), False
        if node["type"] in object_info:
            values = filled_values(object_info[node["type"]], values)
            resized = any(kind(spec) == DYNAMIC_COMBO for spec, _ in layout(object_info[node["type"]], values)[1].values())
        if values != kept.get("widgets_values", []):
            changes.append(f"node {node['id']} widgets_values: {values!r} -> {kept.get('widgets_values')!r}")
        if kept["size"][0] < node["size"][0] or (kept["size"][1] < node["size"][1] and not resized):
            changes.append(f"node {node['id']} size: {node['size']} -> {kept['size']}")
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
# Records the nodes whose "executed" message the page has handled: listeners run in the order they were added, so
# when this one has seen a node, the app's own (which calls the node's onExecuted) has run for it.
RECORD_EXECUTED = """() => {
  window.__tveExecuted = [];
  window.app.api.addEventListener("executed", ({detail}) => window.__tveExecuted.push(String(detail.node)));
}"""


@dataclass
class Editor:
    page: object                                      # playwright.sync_api.Page with the frontend loaded
    console: Console
    comfyui: object                                   # the session's HeadlessComfyUI
    posted: list = field(default_factory=list)        # responses to the page's POST /prompt

    def open(self, workflow: dict) -> dict:
        self.page.evaluate("(w) => window.app.loadGraphData(w)", workflow)
        return self.page.evaluate(GRAPH_STATE)

    def close_dialogs(self) -> None:
        """What an artist does with the dialogs a workflow opens with (missing models): close them (Escape), and
        wait until they are gone."""
        def closed() -> bool | None:
            if not self.page.evaluate("() => !!document.querySelector('.p-dialog-mask')"):
                return True
            self.page.keyboard.press("Escape")
            return None
        self.comfyui.until(closed, "closing the editor's dialogs", self.activity)

    def activity(self) -> int:
        """The page's progress so far. Playwright's sync API hands the page's events to their handlers only during
        a call into it: this call is one."""
        self.page.evaluate("() => null")
        return self.console.activity

    def until(self, condition: str, what: str, arg=None):
        """The page's ``condition`` (a JS function of ``arg``) once it returns something other than null, polled
        while the server lives and the server or the page progresses."""
        return self.comfyui.until(lambda: self.page.evaluate(condition, arg), what, self.activity)

    def queue(self) -> dict:
        """Press Queue; returns the body the frontend posted to /prompt (its ``prompt`` and the server's id)."""
        self.posted.clear()
        self.page.evaluate("() => { window.app.queuePrompt(0, 1); }")
        response = self.comfyui.until(lambda: self.posted[0] if self.activity() and self.posted else None,
                                      "the editor's POST /prompt", self.activity)
        assert response.ok, f"POST /prompt refused the editor's graph ({response.status}): {response.text()}"
        return {**response.request.post_data_json, "prompt_id": response.json()["prompt_id"]}

    def wait(self, prompt_id: str) -> dict:
        return self.comfyui.wait(prompt_id, self.activity)


def new_editor(browser, comfyui, hide_pack: bool) -> Editor:
    """A tab on the session's server, the frontend started; with ``hide_pack`` the pack's node types are left out of
    /object_info and its web files out of /extensions (the frontend never hears of the pack)."""
    page = browser.new_page(viewport=VIEWPORT)
    editor = Editor(page, Console(page), comfyui)
    page.on("response", lambda r: editor.posted.append(r) if r.request.method == "POST" and
            r.url.split("?")[0].endswith("/prompt") else None)
    if hide_pack:
        def without_pack(route, keep):
            response = route.fetch()
            route.fulfill(response=response, json=keep(response.json()))
        page.route(re.compile(r"/object_info$"), lambda route: without_pack(
            route, lambda info: {name: node for name, node in info.items() if not name.startswith("TVE_")}))
        page.route(re.compile(r"/extensions$"), lambda route: without_pack(
            route, lambda files: [f for f in files if f"/{PACK_FOLDER}/" not in f]))
    page.goto(comfyui.url)
    ready = ("() => (window.app?.graph?.nodes?.length > 0 && window.app.extensions?.some((e) => "
             "e.name === 'Comfy.NoteNode')) || null")
    editor.until(ready, "the frontend's start-up")
    if not hide_pack:
        editor.until(f"() => window.app.extensions.some((e) => e.name === {json.dumps(EXTENSION)}) || null",
                     "the pack's extension")
    page.evaluate(RECORD_EXECUTED)
    return editor


@pytest.fixture(scope="module")
def browser(comfyui):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(f"{BROWSER_NEEDED}: Playwright is missing (pip install '.[test]')")
    if CHROMIUM is None:
        pytest.skip(f"{BROWSER_NEEDED}: no chromium on PATH (apt-get install chromium)")
    # An artist who has used ComfyUI before: the editor opens on its default graph, not on the template browser.
    comfyui.request("POST", "/settings/Comfy.TutorialCompleted", json=True).raise_for_status()
    # ... and whose history holds no prompt of the other e2e modules: the non-finite probes of test_bad_inputs put
    # NaN in it, which frontend 1.48's job list cannot parse (an error on every poll; the pack is not involved).
    comfyui.request("POST", "/history", json={"clear": True}).raise_for_status()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def core_only_workflow(object_info: dict) -> dict:
    """A workflow of core nodes only that opens like the shipped ones (a Markdown note, a checkpoint with its
    download URL, a clip the input folder lacks) and saves the frames it reads: the baseline's."""
    from tve.tools.build_workflows import (FRAMES, Node, build_workflow, checkpoint, floor_nodes, source_frames,
                                           start_note, video_steps)
    spec = [start_note("Core nodes only", "The baseline of the graph-editor test.", video_steps(prompt=None)),
            *checkpoint(windows=False), *source_frames(),
            Node("to_video", "CreateVideo", 2, {"fps": 24.0}, {"images": FRAMES, "fps": ("components", "fps"),
                                                             "audio": ("components", "audio")}, group="Save"),
            Node("save", "SaveVideo", 3, {"filename_prefix": "video/tve_e2e_baseline"},
                 {"video": ("to_video", "VIDEO")}, group="Save")]
    return build_workflow(spec, {**object_info, **floor_nodes()})


@pytest.fixture(scope="module")
def baseline(browser, comfyui, object_info) -> list[Message]:
    """Console output of the frontend without the pack: start-up, opening a core-only workflow, running it."""
    editor = new_editor(browser, comfyui, hide_pack=True)
    editor.open(core_only_workflow(object_info))
    editor.close_dialogs()
    editor.page.evaluate(SET_WIDGETS, {"CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
                                       "LoadVideo": {"file": WEB.file},
                                       "ImageScaleToMaxDimension": TYPE_OVERRIDES["ImageScaleToMaxDimension"]})
    entry = editor.wait(editor.queue()["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    editor.page.close()
    return editor.console.take()


@pytest.fixture(scope="module")
def editor(browser, comfyui) -> Editor:
    """One tab with the pack, its extension registered (as an artist keeps one open); its start-up messages are
    kept in ``startup`` for the first test."""
    editor = new_editor(browser, comfyui, hide_pack=False)
    editor.startup = editor.console.take()
    yield editor
    editor.page.close()


def test_frontend_noise_without_the_pack_is_known(baseline):
    """Every console warning and error of the pack-free baseline is a ``KNOWN_NOISE`` entry (the list describes
    the frontend under test; a new frontend's noise is classified by hand, not waved through)."""
    unknown = [m.key for m in baseline if not any(noise.matches(m) for noise in KNOWN_NOISE)]
    assert not unknown, "\n".join(unknown)


def test_the_editor_starts_with_the_pack_without_console_warnings(editor, baseline):
    assert unexcused(editor.startup, baseline) == []


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_opens_unchanged_showing_what_to_set_first(path, editor, baseline, object_info):
    """Opened as shipped: nothing changed, no node over another or smaller than its widgets, every node in one
    group, the numbered nodes and the short Note in view at 100 %, every Note's text inside its box, and no console
    warning the pack causes."""
    workflow = load(path)
    editor.console.take()
    held = editor.open(workflow)
    assert changed_on_load(workflow, held["saved"], object_info) == []
    assert layout_problems(held["boxes"]) == []
    grouped = [str(node_id) for _, nodes in held["groups"] for node_id in nodes]      # 1.48 keeps ids as strings
    assert sorted(grouped) == sorted(str(node["id"]) for node in workflow["nodes"]), f"one group each: {held['groups']}"

    editor.close_dialogs()
    numbered = [node["id"] for node in workflow["nodes"] if NUMBERED.match(node.get("title", ""))]
    start = [node["id"] for node in workflow["nodes"] if node.get("title") == "Start here"]
    assert numbered and len(start) == 1
    hidden = [(node_id, title, points) for node_id, title, points in editor.page.evaluate(IN_VIEW, start + numbered)
              if points]
    assert hidden == [], "not in view where the file opens (graph points covered or off screen)"
    notes = [node["id"] for node in workflow["nodes"] if node["type"] == "MarkdownNote"]
    fits = [editor.page.evaluate(NOTE_FIT, node_id) for node_id in notes]
    assert None not in fits, f"a Note drew no text: {fits}"
    assert [fit for fit in fits if fit[1] > fit[2]] == [], "a Note's text runs past its box"
    assert unexcused(editor.console.take(), baseline) == []


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
        path, source, editor, baseline, comfyui, object_info):
    workflow = load(path)
    editor.console.take()
    editor.open(workflow)
    editor.close_dialogs()
    editor.page.evaluate(SET_WIDGETS, {**TYPE_OVERRIDES, "LoadVideo": {"file": source.file}})
    posted = editor.queue()
    graph = posted["prompt"]
    expected = with_overrides(to_api(workflow, object_info), source)
    assert {node_id: (node["class_type"], declared(node, object_info)) for node_id, node in graph.items()} == {
        node_id: (node["class_type"], node["inputs"]) for node_id, node in expected.items()}, \
        "the editor queued another graph than the file and the changed widgets describe"

    entry = editor.wait(posted["prompt_id"])
    assert_ran_to_the_end(comfyui, object_info, path, graph, entry, source)
    for node_id, node in graph.items():               # web/consistency_metrics.js puts the summary on the node
        if node["class_type"] == "TVE_ConsistencyMetrics":
            editor.until(f"() => window.__tveExecuted.includes({json.dumps(node_id)}) || null",
                         f"the page handling node {node_id}'s output")
            shown = editor.page.evaluate(SUMMARY, int(node_id))
            assert shown == "\n".join(entry["outputs"][node_id]["text"])
    assert unexcused(editor.console.take(), baseline) == []
