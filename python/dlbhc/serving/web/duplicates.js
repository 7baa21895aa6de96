// The near-duplicates page: the groups of /api/duplicates at the chosen
// level, each a row of thumbnails (exact copies marked).  Everything shown
// from the server goes in with textContent, never as HTML.
// (common.js, loaded first, has the helpers both pages use.)
"use strict";

function tile(id, path, copy) {
  const fig = document.createElement("figure");
  fig.className = "result" + (copy ? " copy" : "");
  fig.dataset.id = String(id);
  const img = document.createElement("img");
  img.src = thumbnailUrl(id, 128);
  img.alt = `image ${id}`;
  img.loading = "lazy";
  const cap = document.createElement("figcaption");
  const b = document.createElement("b");
  b.textContent = `#${id}`;
  cap.append(b, copy ? " exact copy" : "", document.createElement("br"),
             path.split("/").pop());
  cap.title = path;
  fig.append(img, cap);
  return fig;
}

function render(found) {
  const box = $("groups");
  box.replaceChildren();
  for (const group of found.groups) {
    const section = document.createElement("section");
    section.className = "group";
    section.dataset.group = String(group.group);
    const h = document.createElement("h2");
    const copies = group.exact_copies.reduce((n, same) => n + same.length - 1, 0);
    h.textContent = `group ${group.group}: ${group.size} images` +
      (copies ? `, ${copies} exact ${copies === 1 ? "copy" : "copies"}` : "");
    const grid = document.createElement("div");
    grid.className = "grid";
    const copyIds = new Set(group.exact_copies.flatMap((same) => same.slice(1)));
    group.ids.forEach((id, k) => grid.append(tile(id, group.paths[k], copyIds.has(id))));
    section.append(h, grid);
    box.append(section);
  }
  setStatus(`${found.groups.length} groups (${found.level}: radius ${found.radius}, ` +
            `threshold ${found.threshold}) among ${found.images.toLocaleString()} images`);
}

async function load() {
  setError("");
  setStatus("finding near-duplicates…");
  const params = new URLSearchParams({ level: $("level").value });
  let response;
  try {
    response = await fetch(`/api/duplicates?${params}`, { credentials: "same-origin" });
  } catch (e) {
    setStatus("");
    setError(`the server cannot be reached (${e.message})`);
    return;
  }
  if (!response.ok) { setStatus(""); setError(await apiError(response)); return; }
  render(await response.json());
}

$("level").addEventListener("change", load);
load();
