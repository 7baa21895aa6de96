// What the pages share (loaded before each page's own script): element
// lookup, the status and error lines, the API's error text, thumbnails.
"use strict";

const $ = (id) => document.getElementById(id);

function show(el, on) { el.hidden = !on; }
function setStatus(text) { $("status").textContent = text; }
function setError(text) { $("error").textContent = text || ""; show($("error"), !!text); }

async function apiError(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${response.status}: ${body.error}`;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

function thumbnailUrl(id, size) { return `/api/images/${id}/thumbnail?size=${size || 128}`; }
