"""The gallery page at ``/``: pick class, seed and strength; see text2img and its refinement side by side.
Plain HTML and JavaScript, nothing fetched from elsewhere (hospital networks are often closed)."""

GALLERY_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>busdiff gallery</title>
<link rel="icon" href="data:,">
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; background: #fafafa; }
  form { display: flex; gap: 1rem; align-items: end; flex-wrap: wrap; margin-bottom: 1.5rem; }
  label { display: flex; flex-direction: column; font-size: .85rem; gap: .25rem; }
  input, select, button { font-size: 1rem; padding: .3rem .5rem; }
  button { cursor: pointer; }
  .pair { display: flex; gap: 1.5rem; }
  figure { margin: 0; text-align: center; }
  figure img { width: 384px; height: 384px; image-rendering: pixelated; background: #000; display: block; }
  figcaption { font-size: .85rem; margin-top: .4rem; }
  #status { margin: .5rem 0 1rem; min-height: 1.2em; font-size: .9rem; }
  #status.error { color: #b00020; }
  pre { font-size: .75rem; background: #eee; padding: .5rem; max-width: 800px; overflow-x: auto; }
</style>
</head>
<body>
<h1>busdiff: hybrid BUS image generation</h1>
<form id="form">
  <label>class <select id="cls">
    <option>benign</option><option>malignant</option><option>normal</option></select></label>
  <label>seed <input id="seed" type="number" min="0" value="0" style="width:7rem"></label>
  <label>img2img strength <span><input id="strength" type="range" min="0.05" max="1" step="0.05" value="0.3">
    <output id="strengthOut">0.3</output></span></label>
  <label>bearer token (if required) <input id="token" type="password" autocomplete="off"></label>
  <button id="go" type="submit">Generate</button>
</form>
<div id="status" role="status"></div>
<div class="pair">
  <figure><img id="t2i" alt="text2img result"><figcaption>text2img</figcaption></figure>
  <figure><img id="refined" alt="img2img refinement">
    <figcaption>after img2img refinement</figcaption></figure>
</div>
<pre id="meta"></pre>
<script>
const $ = (id) => document.getElementById(id);
$("strength").addEventListener("input", () => { $("strengthOut").textContent = $("strength").value; });
$("token").value = sessionStorage.getItem("busdiffToken") || "";

async function generate() {
  const token = $("token").value.trim();
  sessionStorage.setItem("busdiffToken", token);
  const body = { "class": $("cls").value, seed: Number($("seed").value),
                 strength: Number($("strength").value), n: 1, format: "json", include_text2img: true };
  const headers = { "content-type": "application/json" };
  if (token) headers["authorization"] = "Bearer " + token;
  $("status").className = ""; $("status").textContent = "generating...";
  $("go").disabled = true;
  const t0 = performance.now();
  try {
    const r = await fetch("v1/generate", { method: "POST", headers, body: JSON.stringify(body) });
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
    const img = data.images[0];
    $("t2i").src = "data:image/png;base64," + img.text2img_png;
    $("refined").src = "data:image/png;base64," + img.png;
    $("meta").textContent = JSON.stringify(img.metadata, null, 2);
    $("status").textContent = "done in " + ((performance.now() - t0) / 1000).toFixed(1) + " s";
    document.body.dataset.state = "done";
  } catch (e) {
    $("status").className = "error"; $("status").textContent = "failed: " + e.message;
    document.body.dataset.state = "failed";
  } finally {
    $("go").disabled = false;
  }
}
$("form").addEventListener("submit", (ev) => { ev.preventDefault(); generate(); });
if (new URLSearchParams(location.search).has("autorun")) generate();
</script>
</body>
</html>
"""
