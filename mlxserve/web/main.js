// The shell: asks for a token when the server wants one, then shows Chat, Models or Server.
import { api, ApiError, onUnauthorized, setToken, token } from "/app/api.js";
import { $ } from "/app/ui.js";
import { ChatView } from "/app/chat.js";
import { ModelsView } from "/app/models.js";
import { ServerView } from "/app/server.js";

const views = {};
let current = null;
// While the first request runs, a 401 is the start's to explain.
let starting = false;

function showAuth(message) {
  for (const view of Object.values(views)) view.leave?.();
  current = null;
  $("#shell").hidden = true;
  $("#auth").hidden = false;
  $("#auth-error").hidden = !message;
  $("#auth-error").textContent = message || "";
  $("#auth-token").focus();
}

function route() {
  const name = (location.hash.replace(/^#\/?/, "").split("/")[0] || "chat").toLowerCase();
  const tab = views[name] ? name : "chat";
  for (const link of document.querySelectorAll(".tab[data-tab]")) {
    link.classList.toggle("active", link.dataset.tab === tab);
  }
  for (const [key, view] of Object.entries(views)) {
    const section = $(`#view-${key}`);
    const active = key === tab;
    if (!active && !section.hidden) view.leave?.();
    section.hidden = !active;
  }
  current = views[tab];
  current.enter();
}

async function start() {
  const tried = token();
  starting = true;
  try {
    await api("/api/v1/models");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      setToken("");
      showAuth(tried ? "That token is not valid (revoked, or from another server)." : "");
      return;
    }
    throw error;
  } finally {
    starting = false;
  }
  $("#auth").hidden = true;
  $("#shell").hidden = false;
  $("#signout").hidden = !token();
  if (!views.chat) {
    views.chat = new ChatView();
    views.models = new ModelsView(views.chat);
    views.server = new ServerView();
  }
  route();
}

onUnauthorized(() => {
  if (starting) return;
  setToken("");
  showAuth("The server asked for a token again.");
});

$("#auth-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setToken($("#auth-token").value.trim());
  $("#auth-token").value = "";
  start();
});

$("#signout").addEventListener("click", () => {
  setToken("");
  location.hash = "#/chat";
  location.reload();
});

window.addEventListener("hashchange", () => {
  if (!$("#shell").hidden) route();
});

start();
