// clinfed audit serve: live updates and model verification. Reads only; every text is set as text.
"use strict";
(function () {
  const TRAINING = ["ContributionRecorded", "GlobalModelRecorded", "AbsenceRecorded"];
  const page = document.body.dataset.page;
  const job = document.body.dataset.job;
  const status = document.getElementById("live-status");

  // ------------------------------------------------------------------ live updates

  function concerns(message) {
    if (message.event === "LedgerError") return true;
    if (page === "job") return message.job_id === job;
    if (page === "consents") return message.event === "ConsentRecorded";
    if (page === "contributions") return message.event === "ContributionRecorded";
    if (page === "jobs") return TRAINING.includes(message.event);
    return false;
  }

  let refreshing = null;
  async function refresh() {
    refreshing = null;
    const response = await fetch(location.href, { cache: "no-store" });
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const id of ["content", "ledger-error"]) {
      const now = document.getElementById(id);
      const next = fresh.getElementById(id);
      if (now && next) now.replaceWith(next);
      else if (next) document.querySelector("header").after(next);
    }
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  }

  const events = new EventSource("/events");
  events.onopen = () => { status.textContent = "live updates: on"; };
  events.onerror = () => { status.textContent = "live updates: reconnecting..."; };
  events.onmessage = (e) => {
    const message = JSON.parse(e.data);
    if (message.block !== undefined) status.textContent = "live updates: on (last ledger block " + message.block + ")";
    if (concerns(message) && refreshing === null) refreshing = setTimeout(refresh, 250);
  };
  window.addEventListener("beforeunload", () => events.close());

  // ------------------------------------------------------------------ model verification

  const drop = document.getElementById("drop-zone");
  if (!drop) return;
  const input = document.getElementById("model-file");
  const result = document.getElementById("verify-result");

  function show(verdict, ok, lines) {
    result.replaceChildren();
    const head = document.createElement("p");
    head.id = "verify-verdict";
    head.className = ok ? "ok" : "bad";
    head.textContent = verdict;
    result.append(head);
    const list = document.createElement("ul");
    for (const line of lines) {
      const item = document.createElement("li");
      item.textContent = line;
      list.append(item);
    }
    result.append(list);
  }

  async function check(file) {
    show("checking " + file.name + "...", true, []);
    if (!(window.crypto && crypto.subtle)) {
      show("NOT VERIFIED", false, ["This browser cannot hash files on this address (not a secure context): open " +
        "the view at http://127.0.0.1, or use clinfed audit verify --model FILE."]);
      return;
    }
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await file.arrayBuffer()));
    const hex = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
    const response = await fetch("/api/verify?job=" + encodeURIComponent(job) + "&sha256=" + hex,
      { cache: "no-store" });
    const answer = await response.json();
    if (!response.ok) {
      show("NOT VERIFIED", false, [file.name + ": " + answer.error]);
      return;
    }
    const rounds = answer.matched_rounds;
    const where = rounds.length ? "recorded as the global model of round " + rounds.join(", ") + " of job " + job
      : "not recorded for any round of job " + job;
    show(answer.verified ? "VERIFIED" : "NOT VERIFIED", answer.verified,
      [file.name + " (" + file.size + " bytes), sha256 " + hex + ": " + where].concat(answer.problems, answer.notes));
  }

  input.addEventListener("change", () => { if (input.files.length) check(input.files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) check(e.dataTransfer.files[0]);
  });
})();
