// Drives the real ComfyUI frontend in headless Chromium (playwright-core, Debian's
// /usr/bin/chromium) against a running ComfyUI server, and writes what it saw as JSON.
// tests/tier4/test_browser.py starts the server, runs this script and asserts on the JSON;
// the script itself only fails on things it cannot observe at all (no page, timeouts).
//
// Environment:
//   INFSPLIGN_BASE_URL   http://127.0.0.1:PORT of the server (loopback only)
//   INFSPLIGN_WORKFLOW   the UI-format workflow file to load and queue (example workflow d)
//   INFSPLIGN_MARKUP     the prompt text with HTML/script markup for the text-only check
//   INFSPLIGN_SHOTS      folder for screenshots
//   INFSPLIGN_RESULT     where to write the JSON result
//   INFSPLIGN_MODULES    node_modules folder that holds playwright-core
//   INFSPLIGN_CHROMIUM   the browser binary (default /usr/bin/chromium)
//   INFSPLIGN_RUN_TIMEOUT_S  per-queue wait (default 240)
//   INFSPLIGN_TEMPLATES  JSON list of the example workflows' names (file names without .json)
//   INFSPLIGN_BOXES_TEMPLATE the one of them to open from the Templates dialog and run (workflow e)
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createRequire } from "node:module";

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) throw new Error(`${name} is not set`);
  return v;
};
const BASE = env("INFSPLIGN_BASE_URL");
const WORKFLOW = env("INFSPLIGN_WORKFLOW");
const MARKUP = env("INFSPLIGN_MARKUP");
const SHOTS = env("INFSPLIGN_SHOTS");
const RESULT = env("INFSPLIGN_RESULT");
const MODULES = env("INFSPLIGN_MODULES");
const CHROMIUM = env("INFSPLIGN_CHROMIUM", "/usr/bin/chromium");
const RUN_TIMEOUT = 1000 * Number(env("INFSPLIGN_RUN_TIMEOUT_S", "240"));
const TEMPLATES = JSON.parse(env("INFSPLIGN_TEMPLATES"));
const BOXES_TEMPLATE = env("INFSPLIGN_BOXES_TEMPLATE");

const require = createRequire(path.join(path.resolve(MODULES), "noop.js"));
const { chromium } = require("playwright-core");

const result = { timings: {}, console_errors: [], page_errors: [], screenshots: {}, template_responses: [] };
const t0 = Date.now();
const mark = (name) => { result.timings[name] = (Date.now() - t0) / 1000; log(`${name} at ${result.timings[name]} s`); };
const log = (msg) => process.stderr.write(`[browser] ${msg}\n`);

fs.mkdirSync(SHOTS, { recursive: true });
const profile = fs.mkdtempSync(path.join(os.tmpdir(), "infsplign-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1920, height: 1080 },
});
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => { if (m.type() === "error") result.console_errors.push(m.text().slice(0, 500)); });
  page.on("pageerror", (e) => result.page_errors.push(String(e?.message ?? e).slice(0, 500)));
  page.on("dialog", (d) => { result.page_errors.push(`native dialog: ${d.message()}`); d.dismiss(); });
  page.on("response", (r) => {
    if (r.url().includes("/api/workflow_templates")) {
      result.template_responses.push({ url: r.url(), status: r.status(), type: r.headers()["content-type"] ?? null });
    }
  });
  // Deprecation warnings and errors, with the stack that logged them: which script caused it.
  await page.addInitScript(() => {
    window.__infsplignWarnings = [];
    for (const level of ["warn", "error"]) {
      const original = console[level].bind(console);
      console[level] = (...args) => {
        const text = args.map((a) => String(a)).join(" ");
        if (/deprecat/i.test(text)) {
          window.__infsplignWarnings.push({ level, text: text.slice(0, 300), stack: String(new Error().stack).slice(0, 2000),
                                            at: Date.now() });
        }
        return original(...args);
      };
    }
  });

  await page.goto(BASE, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.app?.extensionManager && window.app?.api,
    null, { timeout: 90_000 });
  // Wait for the extensions (ours included) to be registered and the first graph shown.
  await page.waitForFunction(() => window.app.extensions?.length > 10 && document.querySelector('[data-testid="queue-button"]'),
    null, { timeout: 60_000 });
  mark("frontend_ready");
  await page.waitForTimeout(1_500); // the first-run Templates dialog opens a moment later
  await closeDialogs(page);
  // The checks below are for the default (litegraph) renderer; the Vue one ("Nodes 2.0")
  // is checked at the end and switched off again. Undo a run that stopped half-way.
  await page.evaluate(async () => {
    if (window.app.extensionManager.setting.get("Comfy.VueNodes.Enabled")) {
      await window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", false);
    }
  });
  result.frontend = await page.evaluate(() => ({
    version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
    infsplign_extensions: window.app.extensions.map((e) => e.name).filter((n) => /infsplign/i.test(n)),
  }));
  await page.evaluate(() => {
    window.__infsplign = { events: [] };
    for (const ev of ["execution_start", "execution_success", "execution_error", "execution_interrupted", "executed"]) {
      window.app.api.addEventListener(ev, (e) => window.__infsplign.events.push({ ev, detail: e.detail }));
    }
  });

  // 0. The Templates dialog: the pack's workflows, their titles and thumbnails; open workflow
  //    e from it, check its saved view, run it, read its loss plot and its Layout Boxes node.
  result.templates = await templatesCase(page);
  mark("templates_case_done");
  result.boxes_workflow = await boxesWorkflowCase(page);
  mark("boxes_workflow_case_done");

  // 1. Markup in the prompt: rendered as text, never as HTML.
  result.markup = await markupCase(page);
  mark("markup_case_done");

  // 2. Example workflow d, queued with the Run button.
  result.workflow = await workflowCase(page);
  mark("workflow_case_done");

  // 3. Node help: the (i) button of the selection toolbox shows the pack's markdown help.
  result.help = await helpCase(page);
  mark("help_case_done");

  // 4. InfSplign Layout Boxes: draw a box with the mouse, queue, fetch the image.
  result.layout = await layoutCase(page);
  mark("layout_case_done");

  // 5. The same markup graph under the Vue node renderer ("Nodes 2.0", opt-in).
  result.vue = await vueCase(page);
  mark("vue_case_done");
} catch (err) {
  result.fatal = String(err?.stack ?? err);
  log(`FAILED: ${result.fatal}`);
} finally {
  await context.close().catch(() => {});
  fs.rmSync(profile, { recursive: true, force: true });
  result.timings.total = (Date.now() - t0) / 1000;
  fs.writeFileSync(RESULT, JSON.stringify(result, null, 1));
}
process.exit(result.fatal ? 1 : 0);

// ---------------------------------------------------------------------------------------

async function closeDialogs(page) {
  // A fresh user gets the Templates dialog shortly after the first load; an execution
  // error opens a dialog too. Close them with their (x) button (Escape does not always).
  for (let i = 0; i < 5; i++) {
    if (!(await page.locator('[role="dialog"]:visible').count())) return;
    const close = page.locator('[role="dialog"] button:has(.pi-times):visible, [role="dialog"] button[aria-label="Close"]:visible').first();
    if (await close.count()) await close.click({ timeout: 5_000 }).catch(() => {});
    else await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
}

async function click(page, selector) {
  await closeDialogs(page);
  await page.locator(selector).first().click({ timeout: 15_000 });
}

/** Queue the current graph with the Run button; wait for its end. */
async function runGraph(page, label) {
  const before = await page.evaluate(() => window.__infsplign.events.length);
  const started = Date.now();
  await click(page, '[data-testid="queue-button"]');
  await page.waitForFunction(
    (n) => window.__infsplign.events.slice(n).some((e) =>
      ["execution_success", "execution_error", "execution_interrupted"].includes(e.ev)),
    before, { timeout: RUN_TIMEOUT, polling: 250 });
  const events = await page.evaluate((n) => window.__infsplign.events.slice(n), before);
  const end = events.find((e) => e.ev !== "executed" && e.ev !== "execution_start" && e.ev.startsWith("execution_"));
  result.timings[`${label}_run_s`] = (Date.now() - started) / 1000;
  return {
    status: end.ev,
    error: end.ev === "execution_error" ? {
      node_type: end.detail?.node_type, exception_type: end.detail?.exception_type,
      exception_message: end.detail?.exception_message } : null,
    executed: events.filter((e) => e.ev === "executed").map((e) => e.detail?.node),
  };
}

/** A two-node graph: demo model -> Spatial Relation Parse with the given widget values. */
function parseGraph(values) {
  return {
    last_node_id: 2, last_link_id: 1,
    nodes: [
      { id: 1, type: "InfSplignDemoModelLoader", pos: [40, 120], size: [320, 110], flags: {}, order: 0, mode: 0,
        inputs: [], outputs: [{ name: "MODEL", type: "MODEL", links: [] }, { name: "CLIP", type: "CLIP", links: [1] },
                              { name: "VAE", type: "VAE", links: [] }],
        properties: {}, widgets_values: ["default"] },
      { id: 2, type: "InfSplignRelationParse", pos: [420, 120], size: [520, 320], flags: {}, order: 1, mode: 0,
        inputs: [{ name: "clip", type: "CLIP", link: 1 }],
        outputs: [{ name: "relations", type: "SPATIAL_RELATIONS", links: [] }, { name: "summary", type: "STRING", links: [] }],
        properties: {}, widgets_values: values },
    ],
    links: [[1, 1, 1, 2, 0, "CLIP"]], groups: [], config: {}, extra: { ds: { scale: 1, offset: [0, 0] } }, version: 0.4,
  };
}

/** What the DOM holds that markup from the prompt could have created. */
async function injectionReport(page) {
  return page.evaluate(() => {
    const attrs = [];
    for (const el of document.querySelectorAll("*")) {
      // Text in value/title/aria-label attributes is still text; markup would show up as
      // an event handler or a URL attribute.
      for (const a of el.attributes) {
        if (/^(on|src$|srcset$|href$|xlink:href$|srcdoc$|action$|formaction$|style$)/i.test(a.name)
            && (/pwned/.test(a.value) || a.value === "x")) attrs.push(`${el.tagName}[${a.name}]`);
      }
    }
    return {
      pwned: typeof window.__pwned === "undefined" ? null : String(window.__pwned),
      img_src_x: [...document.querySelectorAll("img")].filter((i) => i.getAttribute("src") === "x").length,
      onerror_elements: document.querySelectorAll("[onerror]").length,
      scripts_with_pwned: [...document.querySelectorAll("script")].filter((s) => s.textContent.includes("__pwned")).length,
      bold_left: [...document.querySelectorAll("b")].filter((b) => b.textContent.trim() === "left").length,
      attributes_with_pwned: attrs,
    };
  });
}

async function markupCase(page) {
  const out = {};
  // (a) No relation phrase in the text: the node fails; its message quotes the prompt.
  await page.evaluate(async (g) => { await window.app.loadGraphData(g); }, parseGraph([MARKUP, "", "from text", ""]));
  out.error_run = await runGraph(page, "markup_error");
  await page.waitForTimeout(500);
  const shown = () => page.evaluate((m) => document.body.innerText.includes(m.slice(0, 60)), MARKUP);
  out.error_shown_verbatim = await shown();
  if (!out.error_shown_verbatim) {
    // Newer frontends (1.4x) show a toast first; its "View details" opens the error panel.
    const details = page.getByRole("button", { name: "View details" }).first();
    out.error_details_button = (await details.count()) > 0;
    if (out.error_details_button) {
      await details.click({ timeout: 10_000 });
      await page.waitForFunction((m) => document.body.innerText.includes(m.slice(0, 60)), MARKUP,
        { timeout: 10_000 }).catch(() => {});
      out.error_shown_verbatim = await shown();
    }
  }
  out.after_error = await injectionReport(page);
  await page.screenshot({ path: path.join(SHOTS, "markup_error.png") });
  result.screenshots.markup_error = path.join(SHOTS, "markup_error.png");
  await closeDialogs(page);

  // (b) Objects named by overrides that carry the markup: the summary repeats it.
  const objectA = MARKUP.slice(MARKUP.indexOf("<img"), MARKUP.indexOf(">", MARKUP.indexOf("<img")) + 1) + " cat";
  const objectB = MARKUP.slice(MARKUP.indexOf("<script"), MARKUP.indexOf("</script>") + 9) + " dog";
  out.object_a = objectA;
  out.object_b = objectB;
  await page.evaluate(async (g) => { await window.app.loadGraphData(g); }, parseGraph([MARKUP, objectA, "left", objectB]));
  out.run = await runGraph(page, "markup");
  await page.waitForFunction(() => {
    const n = window.app.graph.nodes.find((x) => x.type === "InfSplignRelationParse");
    return n?.widgets?.some((w) => w.name === "parsed" && w.value);
  }, null, { timeout: 10_000 }).catch(() => {});
  Object.assign(out, await page.evaluate(() => {
    const node = window.app.graph.nodes.find((x) => x.type === "InfSplignRelationParse");
    const widget = node.widgets.find((w) => w.name === "parsed");
    const box = document.querySelector('textarea[data-infsplign="summary"]');
    const text = node.widgets.find((w) => w.name === "text");
    return {
      summary_widget: widget ? String(widget.value) : null,
      summary_box: box ? { value: box.value, readOnly: box.readOnly, children: box.children.length,
                            visible: box.offsetParent !== null && box.getBoundingClientRect().width > 0 } : null,
      text_widget: text ? String(text.value) : null,
      output: window.app.nodeOutputs?.[String(node.id)] ?? null,
    };
  }));
  out.after_run = await injectionReport(page);
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.Canvas.FitView"));
  await page.waitForTimeout(400);
  await page.screenshot({ path: path.join(SHOTS, "markup.png") });
  result.screenshots.markup = path.join(SHOTS, "markup.png");
  return out;
}

async function imagesOf(page, nodeId) {
  return page.evaluate((id) => {
    const node = window.app.graph.getNodeById(id);
    return (node?.imgs ?? []).map((i) => ({ src: i.src, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight }));
  }, nodeId);
}

async function workflowCase(page) {
  const workflow = JSON.parse(fs.readFileSync(WORKFLOW, "utf8"));
  await closeDialogs(page);
  await page.evaluate(async (g) => { await window.app.loadGraphData(g); }, workflow);
  await page.waitForTimeout(800);
  const view = await viewCheck(page);
  const viewShot = path.join(SHOTS, "workflow_d_loaded.png");
  await page.screenshot({ path: viewShot });
  result.screenshots.workflow_d_loaded = viewShot;
  const byType = (t) => workflow.nodes.filter((n) => n.type === t && (n.mode ?? 0) === 0).map((n) => n.id);
  const parseIds = byType("InfSplignRelationParse");
  const saveIds = byType("SaveImage").concat(byType("PreviewImage"));
  const previewIds = byType("InfSplignAttentionPreview");
  const out = { view, parse_nodes: parseIds, image_nodes: saveIds, attention_preview_nodes: previewIds,
                prompt: workflow.nodes.find((n) => n.type === "PrimitiveStringMultiline")?.widgets_values?.[0] ?? null };
  out.run = await runGraph(page, "workflow");
  // Images load asynchronously after the "executed" message.
  const watched = [...saveIds, ...previewIds];
  await page.waitForFunction((ids) => ids.every((id) => {
    const imgs = window.app.graph.getNodeById(id)?.imgs ?? [];
    return imgs.length && imgs.every((i) => i.complete && i.naturalWidth > 0);
  }), watched, { timeout: 30_000, polling: 250 }).catch(() => {});
  out.images = {};
  for (const id of watched) out.images[id] = await imagesOf(page, id);
  out.image_fetch = await page.evaluate(async (ids) => {
    const r = {};
    for (const id of ids) {
      const img = window.app.graph.getNodeById(id)?.imgs?.[0];
      if (!img) continue;
      const resp = await fetch(img.src);
      r[id] = { status: resp.status, type: resp.headers.get("content-type"), bytes: (await resp.arrayBuffer()).byteLength };
    }
    return r;
  }, watched);
  out.summaries = await page.evaluate((ids) => Object.fromEntries(ids.map((id) => {
    const node = window.app.graph.getNodeById(id);
    const w = node.widgets.find((x) => x.name === "parsed");
    const box = w?.element ?? null;
    return [id, { widget: w ? String(w.value) : null, box: box ? box.value : null,
                  box_visible: !!box && box.isConnected && box.getBoundingClientRect().width > 0 }];
  })), parseIds);
  // Not sent back to the server: the display widget is not a node input.
  out.prompt_inputs = await page.evaluate(async (ids) => {
    const p = await window.app.graphToPrompt();
    return Object.fromEntries(ids.map((id) => [id, Object.keys(p.output[String(id)]?.inputs ?? {})]));
  }, parseIds);
  out.after_run = await injectionReport(page);

  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.Canvas.FitView"));
  await page.evaluate(() => {
    const c = window.app.canvas;
    if (c.ds.scale < 0.7) { // keep node text legible (low-quality rendering below ~0.6)
      const el = c.canvas, cx = el.width / 2, cy = el.height / 2;
      c.ds.changeScale(0.7, [cx, cy]);
    }
    c.setDirty(true, true);
  });
  await page.waitForTimeout(600);
  const shot = path.join(SHOTS, "workflow_d.png");
  await page.screenshot({ path: shot });
  result.screenshots.workflow_d = shot;
  // Close-ups of the parse node and the image node(s), at a legible zoom.
  out.closeups = {};
  for (const id of [...parseIds, ...saveIds, ...previewIds]) {
    const box = await page.evaluate((id) => {
      const c = window.app.canvas, n = window.app.graph.getNodeById(id);
      const r = c.canvas.getBoundingClientRect();
      const title = 30, top = 100; // the tab bar and the Run button cover the canvas' top
      const scale = Math.min(1.5, 0.85 * r.width / n.size[0], 0.9 * (r.height - top) / (n.size[1] + title));
      c.ds.scale = scale;
      c.ds.offset[0] = r.width / 2 / scale - (n.pos[0] + n.size[0] / 2);
      c.ds.offset[1] = (top + (r.height - top) / 2) / scale - (n.pos[1] - title + (n.size[1] + title) / 2);
      c.setDirty(true, true);
      const [x, y] = c.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - title]);
      return { x: r.left + x, y: r.top + y, width: n.size[0] * scale, height: (n.size[1] + title) * scale };
    }, id);
    await page.waitForTimeout(400);
    const clip = { x: Math.max(0, box.x - 12), y: Math.max(0, box.y - 12), width: box.width + 24, height: box.height + 24 };
    clip.width = Math.min(clip.width, 1920 - clip.x);
    clip.height = Math.min(clip.height, 1080 - clip.y);
    if (clip.width > 20 && clip.height > 20) {
      const file = path.join(SHOTS, `workflow_d_node_${id}.png`);
      await page.screenshot({ path: file, clip });
      out.closeups[id] = file;
      result.screenshots[`workflow_d_node_${id}`] = file;
    }
  }
  return out;
}

/** Where the frontend's own bars cover the graph: for every node, points of its title bar
 * and its lower corners, and the element the page has there (the canvas, or a DOM widget
 * drawn over the node, are fine; a side bar, toolbar or minimap is not). */
async function viewCheck(page) {
  // Frontend 1.49 opens its right side panel (errors tab) when a workflow misses models, as
  // the default workflow does on a fresh install; it is not one of the default bars: closed.
  await page.evaluate(async () => {
    const setting = window.app.extensionManager.setting;
    if (setting.get("Comfy.RightSidePanel.IsOpen")) await setting.set("Comfy.RightSidePanel.IsOpen", false);
  });
  await page.waitForTimeout(400);
  // A notice the frontend shows for a few seconds (a toast after loading a graph) may sit over
  // a node when the check runs; the bars the check is about stay. A point counts as covered
  // when it is still covered after `looks` looks, `wait` ms apart.
  const looks = 4, wait = 2_000;
  let view = await coveredPoints(page);
  for (let i = 1; i < looks && view.covered.length; i++) {
    await page.waitForTimeout(wait);
    view = await coveredPoints(page);
  }
  return view;
}

async function coveredPoints(page) {
  return page.evaluate(() => {
    const c = window.app.canvas, canvas = c.canvas;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    const covered = [];
    for (const n of window.app.graph.nodes) {
      const [x0, y0] = c.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - title]);
      const [x1, y1] = c.ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
      const ty = y0 + title * c.ds.scale / 2;
      for (const [x, y] of [[x0 + 6, ty], [x1 - 6, ty], [x0 + 6, y1 - 6], [x1 - 6, y1 - 6]]) {
        const inside = x >= 0 && y >= 0 && x < window.innerWidth && y < window.innerHeight;
        const el = inside ? document.elementFromPoint(x, y) : null;
        if (!inside || (el !== canvas && !el?.closest(".dom-widget"))) {
          const notice = el?.closest(".p-toast, [role='alert']");
          covered.push({ node: n.id, type: n.type, point: [Math.round(x), Math.round(y)],
                         by: el ? `${el.tagName}.${String(el.className).slice(0, 60)}` : "outside the window",
                         ...(notice ? { in_notice: String(notice.className).slice(0, 60) } : {}) });
        }
      }
    }
    return { scale: c.ds.scale, offset: [...c.ds.offset], nodes: window.app.graph.nodes.length, covered,
             window: [window.innerWidth, window.innerHeight] };
  });
}

async function templatesCase(page) {
  const out = {};
  await closeDialogs(page);
  // Workflow e dropped on the canvas (before any run, whose notices sit over the canvas for a
  // while): the frontend opens it at its saved view.
  const dropped = JSON.parse(fs.readFileSync(path.join(path.dirname(WORKFLOW), `${BOXES_TEMPLATE}.json`), "utf8"));
  await page.evaluate(async (g) => { await window.app.loadGraphData(g); }, dropped);
  await page.waitForTimeout(800);
  out.dropped_view = await viewCheck(page);
  const droppedShot = path.join(SHOTS, "workflow_e_dropped.png");
  await page.screenshot({ path: droppedShot });
  result.screenshots.workflow_e_dropped = droppedShot;
  out.listing = await page.evaluate(async () => (await fetch("/api/workflow_templates")).json());
  out.module = Object.keys(out.listing).find((m) => TEMPLATES_IN(out.listing[m])) ?? null;
  if (!out.module) return out;
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
  const dialog = page.locator('[role="dialog"]:visible').first();
  await dialog.waitFor({ state: "visible", timeout: 20_000 });
  await dialog.getByText(out.module, { exact: true }).first().click({ timeout: 15_000 });
  await page.waitForFunction((names) => names.every((n) => {
    const card = document.querySelector(`[data-testid="template-workflow-${CSS.escape(n)}"]`);
    const img = card?.querySelector("img");
    return img && img.complete;
  }), TEMPLATES, { timeout: 30_000, polling: 250 }).catch(() => {});
  await page.waitForTimeout(500);
  out.cards = await page.evaluate((names) => Object.fromEntries(names.map((n) => {
    const card = document.querySelector(`[data-testid="template-workflow-${CSS.escape(n)}"]`);
    if (!card) return [n, null];
    const r = card.getBoundingClientRect();
    return [n, { text: card.innerText, visible: r.width > 0 && r.height > 0,
                 images: [...card.querySelectorAll("img")].map((i) => ({
                   src: i.src, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
                   shown: i.getBoundingClientRect().width })) }];
  })), TEMPLATES);
  const shot = path.join(SHOTS, "templates.png");
  await page.screenshot({ path: shot });
  result.screenshots.templates = shot;
  // Open workflow e the way a user does: its card.
  await page.locator(`[data-testid="template-workflow-${BOXES_TEMPLATE}"]`).first().click({ timeout: 15_000 });
  out.opened = await page.waitForFunction(() => window.app.graph.nodes.some((n) => n.type === "InfSplignLayout"),
    null, { timeout: 30_000 }).then(() => true).catch(() => false);
  await page.waitForTimeout(1_000);
  return out;
}

function TEMPLATES_IN(names) {
  return TEMPLATES.every((t) => names.includes(t));
}

/** Workflow e as the Templates dialog opened it: its view, then a run with the Run button. */
async function boxesWorkflowCase(page) {
  const out = {};
  if (!result.templates?.opened) return out;
  out.view = await viewCheck(page);
  const shot = path.join(SHOTS, "workflow_e_loaded.png");
  await page.screenshot({ path: shot });
  result.screenshots.workflow_e_loaded = shot;
  const layoutState = () => page.evaluate(() => {
    const n = window.app.graph.nodes.find((x) => x.type === "InfSplignLayout");
    const editor = document.querySelector('canvas[data-infsplign="box-editor"]');
    const summary = n.widgets.find((w) => w.name === "parsed");
    const box = summary?.element ?? null;
    return { id: n.id, size: [...n.size],
             editor: editor ? [editor.clientWidth, editor.clientHeight] : null,
             summary: summary ? { value: String(summary.value), client_height: box?.clientHeight ?? null,
                                  scroll_height: box?.scrollHeight ?? null,
                                  visible: !!box && box.isConnected && box.getBoundingClientRect().height > 0 } : null };
  });
  out.before = await layoutState();
  const warningsBefore = await page.evaluate(() => window.__infsplignWarnings.length);
  out.run = await runGraph(page, "boxes_workflow");
  const previewId = await page.evaluate(() => window.app.graph.nodes.find((n) => n.type === "InfSplignAttentionPreview")?.id);
  out.preview = previewId;
  await page.waitForFunction((id) => (window.app.graph.getNodeById(id)?.imgs ?? []).length >= 2
    && window.app.graph.getNodeById(id).imgs.every((i) => i.complete && i.naturalWidth > 0)
    && document.querySelector('textarea[data-infsplign="summary"]')?.value,
    previewId, { timeout: 30_000, polling: 250 }).catch(() => {});
  await page.waitForTimeout(800); // the summary's height is fitted a frame later
  out.after = await layoutState();
  out.deprecations = await page.evaluate((n) => window.__infsplignWarnings.slice(n), warningsBefore);
  out.all_deprecations = await page.evaluate(() => window.__infsplignWarnings);
  out.loss_plot = await page.evaluate(async (id) => {
    const img = window.app.graph.getNodeById(id)?.imgs?.[1];
    if (!img) return null;
    const resp = await fetch(img.src);
    const bytes = new Uint8Array(await resp.arrayBuffer());
    let text = "";
    for (const b of bytes) text += String.fromCharCode(b);
    return { src: img.src, status: resp.status, png_base64: btoa(text) };
  }, previewId);
  const after = path.join(SHOTS, "workflow_e_after_run.png");
  await page.screenshot({ path: after });
  result.screenshots.workflow_e_after_run = after;
  // Close-ups: the Layout Boxes node and the preview, at a legible zoom.
  for (const [name, id] of [["layout", out.after.id], ["preview", previewId]]) {
    const clip = await page.evaluate((id) => {
      const c = window.app.canvas, n = window.app.graph.getNodeById(id);
      const top = 140, title = 30;
      const scale = Math.min(1.2, 0.9 * 1700 / n.size[0], 0.9 * (1080 - top) / (n.size[1] + title));
      c.ds.scale = scale;
      c.ds.offset[0] = 960 / scale - (n.pos[0] + n.size[0] / 2);
      c.ds.offset[1] = (top + (1080 - top) / 2) / scale - (n.pos[1] - title + (n.size[1] + title) / 2);
      c.setDirty(true, true);
      const [x, y] = c.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - title]);
      return { x: Math.max(0, x - 10), y: Math.max(0, y - 10), width: Math.min(1920 - Math.max(0, x - 10), n.size[0] * scale + 20),
               height: Math.min(1080 - Math.max(0, y - 10), (n.size[1] + title) * scale + 20) };
    }, id);
    await page.waitForTimeout(500);
    const file = path.join(SHOTS, `workflow_e_${name}.png`);
    await page.screenshot({ path: file, clip });
    result.screenshots[`workflow_e_${name}`] = file;
  }
  return out;
}

async function helpCase(page) {
  const out = {};
  // Every pack node that the server knows has a help page where the frontend looks.
  out.docs = await page.evaluate(async () => {
    const info = await (await fetch("/api/object_info")).json();
    const module = info.InfSplignRelationParse.python_module; // custom_nodes.<pack folder>
    const pack = module.split(".")[1].split("@")[0]; // as the frontend names the pack
    const r = {};
    for (const [name, def] of Object.entries(info)) {
      if (def.python_module !== module) continue;
      const resp = await fetch(`/extensions/${pack}/docs/${name}.md`);
      const text = resp.ok ? await resp.text() : "";
      r[name] = { status: resp.status, heading: text.split("\n")[0], display_name: def.display_name,
                  description: def.description ?? "" };
    }
    return r;
  });
  // The help panel, opened as a user does: select the node, press the (i) button.
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.Canvas.FitView"));
  const id = await page.evaluate(() => {
    const n = window.app.graph.nodes.find((x) => x.type === "InfSplignRelationParse");
    window.app.canvas.deselectAll?.();
    window.app.canvas.selectNode(n);
    window.app.canvas.setDirty(true, true);
    return n.id;
  });
  out.node = id;
  await page.locator('[data-testid="info-button"]').first().waitFor({ state: "visible", timeout: 10_000 });
  await click(page, '[data-testid="info-button"]');
  await page.waitForFunction(() => document.body.innerText.includes("Accepted phrasings"), null, { timeout: 10_000 })
    .catch(() => {});
  out.panel_has_help = await page.evaluate(() => document.body.innerText.includes("Accepted phrasings"));
  out.panel_has_table = await page.evaluate(() => [...document.querySelectorAll("table")].some((t) => t.innerText.includes("to the left of")));
  const shot = path.join(SHOTS, "help_panel.png");
  await page.screenshot({ path: shot });
  result.screenshots.help = shot;
  return out;
}

async function vueCase(page) {
  const out = {};
  await closeDialogs(page);
  await page.evaluate(async () => { await window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", true); });
  try {
    await page.waitForTimeout(500);
    const objectA = result.markup.object_a, objectB = result.markup.object_b;
    await page.evaluate(async (g) => { await window.app.loadGraphData(g); }, parseGraph([MARKUP, objectA, "left", objectB]));
    out.run = await runGraph(page, "vue");
    await page.waitForFunction(() => {
      const n = window.app.graph.nodes.find((x) => x.type === "InfSplignRelationParse");
      const w = n?.widgets?.find((x) => x.name === "parsed");
      return w?.value && [...document.querySelectorAll("textarea")].some((t) => t.value === w.value);
    }, null, { timeout: 10_000 }).catch(() => {});
    Object.assign(out, await page.evaluate(() => {
      const n = window.app.graph.nodes.find((x) => x.type === "InfSplignRelationParse");
      const w = n.widgets.find((x) => x.name === "parsed");
      const boxes = [...document.querySelectorAll("textarea")].filter((t) => w && t.value === w.value && t.isConnected
        && t.getBoundingClientRect().width > 0);
      return { vue_enabled: window.app.extensionManager.setting.get("Comfy.VueNodes.Enabled"),
               summary_widget: w ? String(w.value) : null,
               boxes: boxes.map((t) => ({ readOnly: t.readOnly, children: t.children.length })) };
    }));
    out.after_run = await injectionReport(page);
    const shot = path.join(SHOTS, "markup_vue_nodes.png");
    await page.screenshot({ path: shot });
    result.screenshots.markup_vue_nodes = shot;
  } finally {
    await page.evaluate(async () => { await window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", false); });
  }
  return out;
}


/** Demo model -> Layout Boxes -> InfSplign (KSampler) -> KSampler -> VAEDecode -> SaveImage,
 * built with the frontend's own node classes. `boxes` starts with one box; the red circle's
 * box is drawn with the mouse on the editor. */
async function layoutCase(page) {
  const out = {};
  const TEXT = "a red circle and a blue square";
  const START = [{ object: "blue square", box: [0.55, 0.55, 0.95, 0.95] }];
  await closeDialogs(page);
  const ids = await page.evaluate(async ({ text, start }) => {
    await window.app.loadGraphData({ last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [],
                                      config: {}, extra: {}, version: 0.4 });
    const L = window.LiteGraph, g = window.app.graph;
    const make = (type, pos, values = {}) => {
      const n = L.createNode(type);
      n.pos = pos;
      g.add(n);
      for (const [k, v] of Object.entries(values)) n.widgets.find((w) => w.name === k).value = v;
      return n;
    };
    const model = make("InfSplignDemoModelLoader", [20, 40]);
    const pos = make("CLIPTextEncode", [20, 220], { text });
    const neg = make("CLIPTextEncode", [20, 420], { text: "" });
    const layout = make("InfSplignLayout", [380, 40], { text, boxes: JSON.stringify(start), width: 128, height: 128 });
    layout.setSize([420, Math.max(layout.size[1], 640)]);
    const apply = make("InfSplignApply", [840, 40], { strength: 30, loss: "gelu", alpha: 2, margin: 0.25,
                                                       end_percent: 0.5, temperature: 32 });
    const latent = make("EmptyLatentImage", [840, 560], { width: 128, height: 128, batch_size: 1 });
    const sampler = make("KSampler", [1200, 40], { seed: 1003, steps: 20, cfg: 5, sampler_name: "euler",
                                                    scheduler: "normal" });
    const decode = make("VAEDecode", [1200, 420]);
    const save = make("SaveImage", [1450, 40]);
    model.connect(1, pos, 0); model.connect(1, neg, 0); model.connect(1, layout, 0);
    model.connect(0, apply, 0); layout.connect(0, apply, 1);
    apply.connect(0, sampler, 0); pos.connect(0, sampler, 1); neg.connect(0, sampler, 2); latent.connect(0, sampler, 3);
    sampler.connect(0, decode, 0); model.connect(2, decode, 1); decode.connect(0, save, 0);
    const c = window.app.canvas;
    c.ds.scale = 1;
    c.ds.offset[0] = -layout.pos[0] + 200;
    c.ds.offset[1] = -layout.pos[1] + 120;
    c.setDirty(true, true);
    return { layout: layout.id, save: save.id };
  }, { text: TEXT, start: START });
  out.ids = ids;
  await page.waitForTimeout(800);
  const editor = page.locator('canvas[data-infsplign="box-editor"]').first();
  await editor.waitFor({ state: "visible", timeout: 10_000 });
  await page.locator('input[data-infsplign="box-object"]').first().fill("red circle");
  const geometry = async () => editor.evaluate((el) => ({ rect: el.getBoundingClientRect().toJSON(),
    frame: JSON.parse(el.dataset.frame || "null"), css: [el.clientWidth, el.clientHeight] }));
  let g = await geometry();
  const to = ([fx, fy]) => {
    const sx = g.rect.width / g.css[0], sy = g.rect.height / g.css[1]; // the canvas' zoom
    return [g.rect.x + (g.frame.x + fx * g.frame.w) * sx, g.rect.y + (g.frame.y + fy * g.frame.h) * sy];
  };
  out.drawn = [0.06, 0.08, 0.42, 0.44];
  const [ax, ay] = to(out.drawn.slice(0, 2)), [bx, by] = to(out.drawn.slice(2));
  await page.mouse.move(ax, ay);
  await page.mouse.down();
  await page.mouse.move((ax + bx) / 2, (ay + by) / 2, { steps: 5 });
  await page.mouse.move(bx, by, { steps: 5 });
  await page.mouse.up();
  await page.waitForTimeout(300);
  out.widget = await page.evaluate((id) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === "boxes").value,
                                   ids.layout);
  out.serialized = await page.evaluate((id) => window.app.graph.getNodeById(id).serialize().widgets_values, ids.layout);
  out.prompt_inputs = await page.evaluate(async (id) => (await window.app.graphToPrompt()).output[String(id)]?.inputs ?? null,
                                          ids.layout);
  const shot = path.join(SHOTS, "layout_editor.png");
  await page.screenshot({ path: shot });
  result.screenshots.layout_editor = shot;

  out.run = await runGraph(page, "layout");
  await page.waitForFunction((id) => (window.app.graph.getNodeById(id)?.imgs ?? []).some((i) => i.complete && i.naturalWidth),
                             ids.save, { timeout: 30_000, polling: 250 }).catch(() => {});
  out.image = await page.evaluate(async (id) => {
    const img = window.app.graph.getNodeById(id)?.imgs?.[0];
    if (!img) return null;
    const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
    let text = "";
    for (const b of bytes) text += String.fromCharCode(b);
    return { src: img.src, png_base64: btoa(text) };
  }, ids.save);
  const shot2 = path.join(SHOTS, "layout_after_run.png");
  await page.screenshot({ path: shot2 });
  result.screenshots.layout_after_run = shot2;

  // Markup as an object name: drawn as canvas text, kept as text in the JSON, no element made.
  await page.locator('input[data-infsplign="box-object"]').first().fill(MARKUP.slice(0, 60));
  g = await geometry(); // the node's summary grew after the run: the editor may have moved
  out.markup_drawn = [0.6, 0.1, 0.9, 0.4];
  const [cx, cy] = to(out.markup_drawn.slice(0, 2)), [dx, dy] = to(out.markup_drawn.slice(2));
  await page.mouse.move(cx, cy);
  await page.mouse.down();
  await page.mouse.move(dx, dy, { steps: 4 });
  await page.mouse.up();
  await page.waitForTimeout(300);
  out.markup_widget = await page.evaluate((id) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === "boxes").value,
                                          ids.layout);
  out.after_markup = await injectionReport(page);
  const shot3 = path.join(SHOTS, "layout_markup.png");
  await page.screenshot({ path: shot3 });
  result.screenshots.layout_markup = shot3;
  return out;
}
