// The admin console's only script (served from this origin; the policy allows nothing else).
// Progressive enhancement: every page works without it. What it adds:
// - the health panel ([data-refresh-url]) replaces itself every few seconds with a fresh copy
//   fetched from the server (an HTML fragment rendered there, inserted as parsed nodes);
// - a delete button guarded by a typed confirmation ([data-confirm-input]) stays disabled until
//   the right text is typed (the server checks it again either way).
"use strict";

(function () {
  function refreshPanel(panel) {
    const url = panel.getAttribute("data-refresh-url");
    const seconds = Number(panel.getAttribute("data-refresh-seconds")) || 5;
    const status = document.getElementById(panel.getAttribute("data-status-id") || "");
    let timer = null;

    async function tick() {
      try {
        const response = await fetch(url, {
          credentials: "same-origin",
          headers: { "X-Admin-Fragment": "1" },
          cache: "no-store",
        });
        if (response.status === 401) {
          if (status) status.textContent = "Your console session ended: reload the page to sign in again.";
          return;
        }
        if (!response.ok) throw new Error(String(response.status));
        const html = await response.text();
        const parsed = new DOMParser().parseFromString(html, "text/html");
        const targetId = panel.getAttribute("data-refresh-target") || "";
        const fresh = parsed.getElementById(targetId);
        const current = document.getElementById(targetId);
        if (fresh && current) {
          current.replaceWith(document.importNode(fresh, true));
          if (status) status.textContent = "";
        }
      } catch (error) {
        if (status) status.textContent = "The health panel could not be refreshed; retrying.";
      }
      timer = window.setTimeout(tick, seconds * 1000);
    }

    timer = window.setTimeout(tick, seconds * 1000);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && timer === null) tick();
    });
  }

  function guardConfirmation(input) {
    const expected = input.getAttribute("data-confirm-input");
    const button = document.getElementById(input.getAttribute("data-confirm-button") || "");
    if (!button) return;
    const update = () => {
      button.disabled = input.value.trim() !== expected;
    };
    input.addEventListener("input", update);
    update();
  }

  function start() {
    document.querySelectorAll("[data-refresh-url]").forEach(refreshPanel);
    document.querySelectorAll("[data-confirm-input]").forEach(guardConfirmation);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
