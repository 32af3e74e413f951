// NexGate dashboard: the only script (served from this origin; the CSP forbids inline script).
// Copy buttons, print buttons and selects that submit their form. Every page works without it.
"use strict";
document.addEventListener("click", function (event) {
  var copy = event.target.closest("[data-copy]");
  if (copy) {
    var source = document.getElementById(copy.getAttribute("data-copy"));
    var text = source ? source.textContent : "";
    var done = function () { copy.textContent = "Copied"; setTimeout(function () { copy.textContent = "Copy"; }, 2000); };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { selectText(source); });
    } else {
      selectText(source);
      try { document.execCommand("copy"); done(); } catch (e) { /* selected: the user copies by hand */ }
    }
  }
  if (event.target.closest("[data-print]")) { window.print(); }
});
document.addEventListener("change", function (event) {
  if (event.target.matches("select[data-autosubmit]")) { event.target.form.submit(); }
});
function selectText(node) {
  if (!node) { return; }
  var range = document.createRange();
  range.selectNodeContents(node);
  var selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}
