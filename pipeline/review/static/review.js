// Slice scrolling of the case page: one slider drives every panel (all panels share the
// follow-up's grid, so the same index is the same anatomy). Slices are server-rendered PNGs;
// the next and previous ones are preloaded so that scrolling does not wait on the server.
(function () {
  "use strict";
  var viewer = document.getElementById("viewer");
  var slider = document.getElementById("slice");
  if (!viewer || !slider) { return; }
  var item = viewer.dataset.item;
  var n = parseInt(viewer.dataset.slices, 10);
  var keySlice = parseInt(viewer.dataset.key, 10);
  var images = Array.prototype.slice.call(viewer.querySelectorAll("img.slice-img"));
  var label = document.getElementById("slice-number");
  var cache = {};

  function url(img, k) {
    return "/case/" + item + "/slice/" + img.dataset.view + "/" + img.dataset.panel + "/" + k + ".png";
  }
  function preload(k) {
    if (k < 0 || k >= n) { return; }
    images.forEach(function (img) {
      var u = url(img, k);
      if (!cache[u]) { cache[u] = new Image(); cache[u].src = u; }
    });
  }
  function show(k) {
    k = Math.max(0, Math.min(n - 1, k));
    slider.value = k;
    label.textContent = (k + 1) + " / " + n;
    images.forEach(function (img) { img.src = url(img, k); });
    preload(k + 1);
    preload(k - 1);
  }
  slider.addEventListener("input", function () { show(parseInt(slider.value, 10)); });
  document.getElementById("to-key").addEventListener("click", function () { show(keySlice); });
  viewer.addEventListener("wheel", function (e) {
    e.preventDefault();
    show(parseInt(slider.value, 10) + (e.deltaY > 0 ? 1 : -1));
  }, { passive: false });
  document.addEventListener("keydown", function (e) {
    var tag = e.target.tagName;  // typing in a form field must not scroll the images
    if (tag === "TEXTAREA" || tag === "SELECT" || (tag === "INPUT" && e.target !== slider)) { return; }
    if (e.key === "ArrowUp" || e.key === "ArrowRight") { e.preventDefault(); show(parseInt(slider.value, 10) + 1); }
    if (e.key === "ArrowDown" || e.key === "ArrowLeft") { e.preventDefault(); show(parseInt(slider.value, 10) - 1); }
  });
  preload(keySlice + 1);
  preload(keySlice - 1);
}());
