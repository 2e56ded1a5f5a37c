"""The chat page the bot server shows at /: one self-contained HTML document (inline CSS and script, no CDN).

    python -c "from nnforge.apps.bot.page import chat_page; print(chat_page('Shop help', 'Hello!'))" > chat.html

The script posts each message to /v1/chat with the page's session id (kept in sessionStorage, so a reload continues
the conversation) and shows the reply with what the bot did: the intent it understood, the FAQ page it quoted, the
ticket it opened. Every text from the server is set with textContent, never parsed as HTML; errors (an empty or too
long message) are shown as the server words them.
"""

from __future__ import annotations

from nnforge.evaluation._html import esc

STYLE = """
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 -apple-system, "Segoe UI", "Noto Sans", Helvetica, Arial, sans-serif;
       background: #f6f8fa; color: #1f2328; }
header { background: #1f2328; color: #fff; padding: 14px 20px; font-size: 18px; font-weight: 600; }
main { max-width: 760px; margin: 0 auto; padding: 16px; display: flex; flex-direction: column;
       height: calc(100vh - 54px); }
#log { flex: 1; overflow-y: auto; padding: 8px 0; }
.msg { max-width: 80%; margin: 6px 0; padding: 8px 12px; border-radius: 12px; white-space: pre-wrap;
       word-break: break-word; }
.user { margin-left: auto; background: #0969da; color: #fff; border-bottom-right-radius: 3px; }
.bot { background: #fff; border: 1px solid #d1d9e0; border-bottom-left-radius: 3px; }
.error { background: #fff8c5; border: 1px solid #d4a72c; }
.meta { display: block; margin-top: 4px; font-size: 12px; color: #59636e; }
form { display: flex; gap: 8px; padding-top: 8px; border-top: 1px solid #d1d9e0; }
#message { flex: 1; padding: 10px 12px; font-size: 15px; border: 1px solid #d1d9e0; border-radius: 8px; }
button { padding: 10px 18px; font-size: 15px; border: 0; border-radius: 8px; background: #1a7f37; color: #fff;
         cursor: pointer; }
button:disabled { background: #8c959f; }
"""

SCRIPT = r"""
(function () {
  var log = document.getElementById("log"), form = document.getElementById("chat"),
      input = document.getElementById("message"), send = document.getElementById("send");
  var session = sessionStorage.getItem("nnforge-bot-session");
  if (!session) {
    var bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    session = "web-" + Array.from(bytes, function (b) { return b.toString(16).padStart(2, "0"); }).join("");
    sessionStorage.setItem("nnforge-bot-session", session);
  }
  function add(cls, text, meta, route) {
    var div = document.createElement("div");
    div.className = "msg " + cls;
    div.textContent = text;
    if (route) { div.dataset.route = route; }
    if (meta) {
      var m = document.createElement("span");
      m.className = "meta";
      m.textContent = meta;
      div.appendChild(m);
    }
    log.appendChild(div);
    log.scrollTop = log.scrollHeight;
    return div;
  }
  function describe(r) {
    if (r.route === "intent") { return "intent " + r.intent + " (" + r.confidence.toFixed(2) + ")"; }
    if (r.route === "slot") { return "asking for " + r.pending; }
    if (r.route === "faq") { return "from the help pages: " + r.source.doc + " \u203a " + r.source.title; }
    if (r.route === "handoff") { return "passed to a person: ticket " + r.ticket; }
    return r.route;
  }
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var text = input.value;
    add("user", text);
    input.value = "";
    send.disabled = true;
    fetch("v1/chat", {method: "POST", headers: {"Content-Type": "application/json"},
                      body: JSON.stringify({session: session, message: text})})
      .then(function (res) {
        return res.json().then(function (body) { return {ok: res.ok, status: res.status, body: body}; });
      })
      .then(function (r) {
        if (r.ok) { add("bot", r.body.reply, describe(r.body), r.body.route); }
        else { add("error", r.body.detail || ("error " + r.status), "error " + r.status, "error"); }
      })
      .catch(function (err) { add("error", "The bot could not be reached (" + err + ").", "", "error"); })
      .finally(function () { send.disabled = false; input.focus(); });
  });
  input.focus();
})();
"""


def chat_page(name: str, greeting: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(name)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<header>{esc(name)}</header>\n<main>\n"
            f'<div id="log"><div class="msg bot" data-route="greeting">{esc(greeting)}</div></div>\n'
            f'<form id="chat" autocomplete="off"><input id="message" name="message" maxlength="2000" '
            f'placeholder="Type a message" aria-label="message"><button id="send" type="submit">Send</button></form>\n'
            f"</main>\n<script>{SCRIPT}</script>\n</body>\n</html>\n")
