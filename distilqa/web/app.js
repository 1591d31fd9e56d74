// The page of `distilqa serve`: ask (POST /), then look inside the answer (POST /explain), drawn as SVG
// and canvas here. Every request goes to the service that served this page; nothing else is fetched.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const ANSWER = "#e6550d";
const OTHER = "#3182bd";
const TOP_K = 5;
const $ = (id) => document.getElementById(id);
const state = { question: "", context: "", explanation: null, token: null };

// 3 significant digits, as every score on the page is printed.
const fmt = (x) => (x === null || x === undefined ? "–" : Number(x).toPrecision(3));

function el(tag, attributes = {}, text = null, namespace = null) {
  const node = namespace ? document.createElementNS(namespace, tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}
const svgEl = (tag, attributes = {}, text = null) => el(tag, attributes, text, SVG);

async function postJSON(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const payload = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (!response.ok) throw new Error(payload.error || `the service answered ${response.status}`);
  return payload;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// ---------------------------------------------------------------- asking

async function ask(event) {
  event.preventDefault();
  const question = $("question").value;
  const context = $("context").value;
  showError("");
  $("answer-button").disabled = true;
  $("busy").textContent = "answering…";
  try {
    const inputs = { question, context };
    // The answer itself with the service's defaults; the alternatives with top_k (which widens the
    // candidates per window, so its first answer may differ in score).
    const [answer, alternatives] = await Promise.all([
      postJSON("/", { inputs }),
      postJSON("/", { inputs, parameters: { top_k: TOP_K } }),
    ]);
    Object.assign(state, { question, context, token: null });
    showAnswer(context, answer, alternatives);
    $("busy").textContent = "looking inside…";
    await explain(null);
  } catch (error) {
    showError(error.message);
  } finally {
    $("answer-button").disabled = false;
    $("busy").textContent = "";
  }
}

function showAnswer(context, answer, alternatives) {
  $("result").hidden = false;
  const line = $("answer-line");
  line.replaceChildren();
  if (answer.answer === "") {
    line.append("No answer (the empty answer scores highest) ", el("span", { class: "score" }, `score ${fmt(answer.score)}`));
  } else {
    line.append(el("strong", {}, answer.answer), " ",
      el("span", { class: "score" }, `score ${fmt(answer.score)}, characters ${answer.start}–${answer.end}`));
  }
  const text = $("highlighted");
  text.replaceChildren(context.slice(0, answer.start));
  if (answer.end > answer.start) text.append(el("mark", {}, context.slice(answer.start, answer.end)));
  text.append(context.slice(answer.end));
  $("alternatives").replaceChildren(...alternatives.map((item) =>
    el("li", {}, `${item.answer === "" ? "(no answer)" : item.answer} — score ${fmt(item.score)}`)));
}

// ---------------------------------------------------------------- looking inside

async function explain(head) {
  const body = { question: state.question, context: state.context };
  if (head) body.head = head;
  const explanation = await postJSON("/explain", body);
  state.explanation = explanation;
  if (state.token === null) state.token = explanation.span.start_token;
  $("inside").hidden = false;
  const w = explanation.window;
  const where = w.count > 1 ? ` (window ${w.index + 1} of ${w.count})` : "";
  $("inside-summary").textContent =
    `${w.tokens.length} tokens${where}; the chosen span is tokens ${explanation.span.start_token}–` +
    `${explanation.span.end_token}, p_start × p_end = ${fmt(explanation.span.score)}.`;
  drawProbabilities(explanation);
  drawTokens(explanation);
  drawHeadMap(explanation);
  drawOverview(explanation);
  drawLens(explanation);
}

const inSpan = (e, i) => e.span.start_token <= i && i <= e.span.end_token;

function drawProbabilities(e) {
  const keys = e.attention.keys;
  const room = $("probabilities").parentElement.clientWidth - 90; // fit the page where bars stay >= 6 px
  const bar = Math.max(6, Math.min(18, room / keys.length));
  const width = 80 + keys.length * bar;
  const rowHeight = 90;
  const labelRoom = 90;
  const svg = $("probabilities");
  svg.replaceChildren();
  svg.setAttribute("width", width);
  svg.setAttribute("height", 2 * rowHeight + labelRoom + 20);
  ["start", "end"].forEach((name, row) => {
    const values = keys.map((i) => e.probabilities[name][i]);
    const top = Math.max(...values) || 1;
    const y0 = 10 + row * rowHeight;
    svg.append(svgEl("text", { x: 0, y: y0 + rowHeight / 2, class: "axis" }, `p(${name})`));
    svg.append(svgEl("text", { x: 0, y: y0 + rowHeight / 2 + 14, fill: "#5a5a5f" }, `max ${fmt(top)}`));
    values.forEach((value, column) => {
      const height = (value / top) * (rowHeight - 12);
      const rect = svgEl("rect", {
        x: 80 + column * bar + 1, y: y0 + rowHeight - 6 - height, width: bar - 2, height: Math.max(height, 0.5),
        fill: inSpan(e, keys[column]) ? ANSWER : OTHER,
      });
      rect.append(svgEl("title", {}, `${e.window.tokens[keys[column]]}: p(${name}) = ${fmt(value)}`));
      svg.append(rect);
    });
  });
  const every = Math.ceil(keys.length / Math.floor(width / 12)); // thin the labels where they would collide
  keys.forEach((i, column) => {
    if (column % every !== 0 && !inSpan(e, i)) return;
    const x = 80 + column * bar + bar / 2;
    const y = 2 * rowHeight + 16;
    svg.append(svgEl("text", {
      x, y, transform: `rotate(-60 ${x} ${y})`, "text-anchor": "end",
      fill: inSpan(e, i) ? ANSWER : "#333",
    }, e.window.tokens[i]));
  });
}

function drawTokens(e) {
  const tokens = $("tokens");
  tokens.replaceChildren();
  const head = e.selected_head;
  $("head-title").textContent = `Attention of layer ${head.layer}, head ${head.head} (${head.reason})`;
  e.window.tokens.forEach((token, i) => {
    const classes = ["tok"];
    if (inSpan(e, i)) classes.push("span");
    if (e.window.sequence_ids[i] === 0) classes.push("question");
    const button = el("button", { type: "button", class: classes.join(" "), "data-index": i }, token);
    const choose = () => selectToken(i);
    button.addEventListener("mouseenter", choose);
    button.addEventListener("focus", choose);
    button.addEventListener("click", choose);
    tokens.append(button);
  });
  selectToken(state.token);
}

function selectToken(index) {
  const e = state.explanation;
  state.token = index;
  const row = e.selected_head.weights[index];
  const top = Math.max(...row) || 1;
  for (const button of $("tokens").children) {
    const j = Number(button.dataset.index);
    button.style.background = `rgba(49,130,189,${(0.6 * row[j] / top).toFixed(3)})`; // light: the text stays legible
    button.classList.toggle("selected", j === index);
    button.setAttribute("aria-pressed", j === index ? "true" : "false");
  }
  const best = row.map((value, j) => [value, j]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  $("token-detail").textContent = `“${e.window.tokens[index]}” (token ${index}) looks most at: ` +
    best.map(([value, j]) => `“${e.window.tokens[j]}” ${fmt(value)}`).join(", ");
}

function drawHeadMap(e) {
  const weights = e.selected_head.weights; // (seq, seq): rows attend to columns
  const n = weights.length;
  const canvas = $("head-map");
  canvas.width = n;
  canvas.height = n;
  const scale = Math.max(1, Math.floor(420 / n));
  canvas.style.width = `${n * scale}px`;
  canvas.style.height = `${n * scale}px`;
  const context = canvas.getContext("2d");
  const image = context.createImageData(n, n);
  const top = Math.max(...weights.map((row) => Math.max(...row))) || 1;
  weights.forEach((row, i) => row.forEach((value, j) => {
    const t = 1 - value / top; // white (0) to blue (the head's largest weight)
    const at = 4 * (i * n + j);
    image.data.set([Math.round(33 + 222 * t), Math.round(102 + 153 * t), Math.round(172 + 83 * t), 255], at);
  }));
  context.putImageData(image, 0, 0);
  canvas.title = "rows: attending token; columns: attended token; hover a row to select its token";
  canvas.onmousemove = (event) => {
    const i = Math.floor(event.offsetY / scale);
    if (i >= 0 && i < n && i !== state.token) selectToken(i);
  };
}

function colour(t) { // 0..1 -> light yellow to dark blue
  const stops = [[255, 255, 204], [161, 218, 180], [65, 182, 196], [44, 127, 184], [37, 52, 148]];
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const k = Math.min(Math.floor(x), stops.length - 2);
  const f = x - k;
  const mix = stops[k].map((a, c) => Math.round(a + f * (stops[k + 1][c] - a)));
  return `rgb(${mix.join(",")})`;
}

function drawOverview(e) {
  const grid = e.attention.on_span; // [layer][head], null for a pruned head
  const layers = grid.length;
  const heads = grid[0].length;
  const size = 46;
  const svg = $("overview");
  svg.replaceChildren();
  svg.setAttribute("width", 70 + heads * size + 120);
  svg.setAttribute("height", 30 + layers * size + 10);
  const values = grid.flat().filter((v) => v !== null);
  const top = Math.max(...values) || 1;
  for (let h = 0; h < heads; h++) {
    svg.append(svgEl("text", { x: 70 + h * size + size / 2, y: 20, "text-anchor": "middle" }, `head ${h}`));
  }
  grid.forEach((row, layer) => {
    svg.append(svgEl("text", { x: 62, y: 30 + layer * size + size / 2 + 4, "text-anchor": "end" }, `layer ${layer}`));
    row.forEach((value, head) => {
      const x = 70 + head * size;
      const y = 30 + layer * size;
      const selected = layer === e.selected_head.layer && head === e.selected_head.head;
      if (value === null) {
        svg.append(svgEl("text", { x: x + size / 2, y: y + size / 2 + 4, "text-anchor": "middle", fill: "#999" }, "pruned"));
        return;
      }
      const cell = svgEl("rect", {
        x: x + 1, y: y + 1, width: size - 2, height: size - 2, fill: colour(value / top), class: "cell",
        stroke: selected ? "#d00" : "none", "stroke-width": selected ? 3 : 0,
        tabindex: 0, role: "button", "aria-label": `layer ${layer}, head ${head}: ${fmt(value)}`,
      });
      cell.append(svgEl("title", {}, `layer ${layer}, head ${head}: ${fmt(value)} of the attention on the span`));
      const choose = () => explain([layer, head]).catch((error) => showError(error.message));
      cell.addEventListener("click", choose);
      cell.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); choose(); }
      });
      svg.append(cell);
      svg.append(svgEl("text", {
        x: x + size / 2, y: y + size / 2 + 4, "text-anchor": "middle", "pointer-events": "none",
        fill: value / top > 0.55 ? "white" : "#222",
      }, fmt(value).replace(/^0\./, ".")));
    });
  });
  // Colour bar: 0 to the grid's largest value.
  const x0 = 70 + heads * size + 30;
  for (let k = 0; k < 50; k++) {
    svg.append(svgEl("rect", { x: x0, y: 30 + (layers * size) * (1 - (k + 1) / 50), width: 16,
      height: layers * size / 50 + 0.5, fill: colour((k + 0.5) / 50) }));
  }
  svg.append(svgEl("text", { x: x0 + 22, y: 38 }, fmt(top)));
  svg.append(svgEl("text", { x: x0 + 22, y: 30 + layers * size }, "0"));
}

function drawLens(e) {
  const lens = e.logit_lens;
  const depths = lens.layers.length;
  const width = Math.max(460, 160 + depths * 110);
  const height = 290;
  const svg = $("lens");
  svg.replaceChildren();
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const series = [ // the answer drawn last, on top, with larger dots
    { name: "the chosen token span, among all spans (not merged)", ranks: lens.span_rank, colour: OTHER, r: 4 },
    { name: "the answer, decoded as the pipeline does", ranks: lens.answer_rank, colour: ANSWER, r: 7 },
  ];
  const worst = Math.max(2, ...series.flatMap((s) => s.ranks.filter((r) => r !== null)));
  const top = 30;
  const bottom = height - 90;
  const y = (rank) => top + (Math.log(rank) / Math.log(worst)) * (bottom - top); // log scale, rank 1 on top
  const x = (depth) => 90 + depth * 110;
  for (const tick of [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000].filter((t) => t <= worst)) {
    svg.append(svgEl("line", { x1: 80, x2: width - 60, y1: y(tick), y2: y(tick), stroke: "#e4e4e8" }));
    svg.append(svgEl("text", { x: 74, y: y(tick) + 4, "text-anchor": "end" }, String(tick)));
  }
  svg.append(svgEl("text", { x: 4, y: 12 }, "rank (1 = best)"));
  lens.layers.forEach((name, depth) => {
    svg.append(svgEl("text", { x: x(depth), y: bottom + 22, "text-anchor": "middle" }, name));
  });
  series.forEach((s, k) => {
    const points = s.ranks.map((rank, depth) => (rank === null ? null : [x(depth), y(rank)]));
    const path = points.filter((p) => p !== null).map((p, i) => `${i ? "L" : "M"}${p[0]},${p[1]}`).join("");
    svg.append(svgEl("path", { d: path, stroke: s.colour, "stroke-width": 2.5, fill: "none" }));
    points.forEach((p, depth) => {
      if (p === null) return;
      const dot = svgEl("circle", { cx: p[0], cy: p[1], r: s.r, fill: s.colour });
      dot.append(svgEl("title", {}, `${lens.layers[depth]}: ${s.name}, rank ${s.ranks[depth]}`));
      svg.append(dot);
    });
    const legend = height - 38 + (1 - k) * 18; // the answer's entry first
    svg.append(svgEl("rect", { x: 90, y: legend - 4, width: 16, height: 5, fill: s.colour }));
    svg.append(svgEl("text", { x: 112, y: legend + 2 }, s.name));
  });
  $("lens-note").textContent =
    `The model's span head read after each stage. Orange: the rank of the answer “${e.answer.answer}” among the ` +
    `answers that stage would give, decoded as the pipeline decodes (${lens.candidates_per_window} candidate ` +
    "spans per window, widened to words, equal texts summed); missing where it is not among them. Blue: the " +
    `rank of the chosen token span among all ${lens.spans_ranked} spans by p_start × p_end, before any merging.`;
  const table = $("lens-table");
  table.replaceChildren(el("tr"));
  ["after", "would answer", "its score", "answer's rank", "answer's score", "span's rank"].forEach((name) =>
    table.firstChild.append(el("th", {}, name)));
  lens.layers.forEach((name, depth) => {
    const row = el("tr");
    row.append(el("td", { class: "text" }, name), el("td", { class: "text" }, lens.stage_answer[depth]),
      el("td", {}, fmt(lens.stage_score[depth])), el("td", {}, lens.answer_rank[depth] ?? "–"),
      el("td", {}, fmt(lens.answer_score[depth])), el("td", {}, lens.span_rank[depth] ?? "–"));
    table.append(row);
  });
}

// ---------------------------------------------------------------- examples and start-up

async function loadExamples() {
  const examples = await fetch("/examples").then((r) => (r.ok ? r.json() : [])).catch(() => []);
  if (!examples.length) return;
  const select = $("example");
  examples.forEach((example, i) => select.append(el("option", { value: i }, `${example.title}: ${example.question}`)));
  select.addEventListener("change", () => {
    const example = examples[Number(select.value)];
    if (!example) return;
    $("question").value = example.question;
    $("context").value = example.context;
  });
  $("examples-row").hidden = false;
}

async function loadInfo() {
  const info = await fetch("/info").then((r) => r.json()).catch(() => null);
  if (info) $("model-info").textContent = `Model ${info.model || "(unnamed)"}, ${info.dtype} on ${info.device}.`;
}

$("ask").addEventListener("submit", ask);
loadExamples();
loadInfo();
