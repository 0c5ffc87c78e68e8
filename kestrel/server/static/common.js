// What the three pages share: the API key (entered once, kept in this browser), JSON and streaming calls to the
// public API, and markdown rendering (marked, vendored; raw HTML in replies is shown as text, never run).
"use strict";

const Kestrel = (() => {
  const KEY = "kestrel-api-key";

  function key() { return localStorage.getItem(KEY) || ""; }

  function headers(extra) {
    const h = Object.assign({"Content-Type": "application/json"}, extra || {});
    if (key()) h["Authorization"] = "Bearer " + key();
    return h;
  }

  // every page's header: the pages, and the API key field
  const PAGES = [["/", "Playground"], ["/arena", "Arena"], ["/leaderboard", "Leaderboard"]];

  function header() {
    const links = PAGES.map(([path, name]) =>
      `<a${path === location.pathname ? ' class="here"' : ""} href="${path}">${name}</a>`).join("");
    document.querySelector("header").innerHTML = `<b>Kestrel</b>${links}<span class="spacer"></span>` +
      '<label>API key <input id="api-key" type="password" placeholder="if the server has one"></label>';
    const input = document.getElementById("api-key");
    input.value = key();
    input.addEventListener("change", () => { localStorage.setItem(KEY, input.value.trim()); location.reload(); });
  }

  async function errorOf(resp) {
    try { const body = await resp.json(); return (body.error && body.error.message) || resp.statusText; }
    catch (e) { return resp.statusText; }
  }

  async function getJSON(path) {
    const resp = await fetch(path, {headers: headers()});
    if (!resp.ok) throw new Error(resp.status + ": " + await errorOf(resp));
    return resp.json();
  }

  async function postJSON(path, body) {
    const resp = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body)});
    if (!resp.ok) throw new Error(resp.status + ": " + await errorOf(resp));
    return resp.json();
  }

  // POST a body and call onEvent(obj) for each server-sent event ("data: {...}"); resolves at the end
  async function stream(path, body, onEvent, signal) {
    const resp = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body), signal});
    if (!resp.ok) throw new Error(resp.status + ": " + await errorOf(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (line.startsWith("data: ") && line !== "data: [DONE]") onEvent(JSON.parse(line.slice(6)));
        }
      }
    }
  }

  function escapeHTML(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  marked.use({renderer: {html(token) { return escapeHTML(token.text || token.raw || ""); }}});

  function markdown(text) { return marked.parse(text); }

  function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

  return {key, headers, header, getJSON, postJSON, stream, markdown, escapeHTML, fmt};
})();

const $ = (id) => document.getElementById(id);
document.addEventListener("DOMContentLoaded", Kestrel.header);
