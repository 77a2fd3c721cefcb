// The chatd web console: one page, plain JavaScript modules, the vendored
// socket.io client (window.io). It doubles as the living example of how a
// frontend uses chatd's API: REST for pages, the socket for live events,
// `join-chat {since_version}` to catch up exactly after any absence.
import { $, h, append, clear, show, timeOf } from "./dom.js";
import { Api, ApiError, enc, publicJson } from "./api.js";

const QUICK_REACTIONS = ["👍", "❤️", "😂", "🎉", "👀"];
const TYPING_EVERY_MS = 2000;
const TYPING_SHOWN_MS = 3500;
const LIVE_CHATS = 20; // chats of the list joined for live unread counts

const state = {
  token: null,
  user: null, // user_id
  byName: false, // signed in through "sign in as NAME": a new token can be minted
  info: { sign_in_as: false, max_message_length: 4000 },
  features: { search: false, mentions: false, direct: false },
  chats: new Map(), // chat_id -> chat list item
  open: null, // the open chat: {id, chat, messages: Map(id -> msg), version, oldest, newest, hasMore}
  socket: null,
  typing: new Map(), // user_id -> timer
  online: new Map(), // chat_id -> Set(user_id)
  mode: null, // composer mode: {kind: "edit"|"reply", message}
  panel: null, // {kind: "thread"|"search"|"mentions"|"pins", message?}
  lastTypingSent: 0,
};

const api = new Api(() => state.token, renewToken);

// -- small things -----------------------------------------------------------

let toastTimer = null;
function toast(text) {
  const node = $("toast");
  node.textContent = text;
  show(node, true);
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => show(node, false), 5000);
}

function failed(err) {
  toast(err instanceof ApiError ? err.message : String(err && err.message ? err.message : err));
}

// A client_id makes a send idempotent (a retry after a drop is not a second
// message). crypto.randomUUID needs a secure context; a team's chatd on plain
// http://host:8080 is not one, getRandomValues works everywhere.
function clientId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return `console-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function setConn(stateName, text) {
  const node = $("conn");
  node.dataset.state = stateName;
  node.textContent = text;
}

function userOfToken(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(decodeURIComponent(escape(atob(part))));
    for (const name of ["sub", "id", "userId"]) {
      if (claims[name] !== undefined && claims[name] !== null) return String(claims[name]);
    }
  } catch (err) {
    // not a JWT we can read: the server decides anyway
  }
  return null;
}

function chatName(chat) {
  if (chat.kind === "direct") {
    const others = (chat.members || []).map((m) => m.user_id).filter((u) => u !== state.user);
    return others.length ? `@${others[0]}` : chat.title || "direct chat";
  }
  return chat.title || chat.id;
}

function myRole(chat) {
  const me = (chat.members || []).find((m) => m.user_id === state.user);
  return me ? me.role : null;
}

// -- sign in ----------------------------------------------------------------

async function start() {
  try {
    state.info = await publicJson("GET", "/console/info");
  } catch (err) {
    // an older chatd: paste a token
  }
  show($("signin-name"), state.info.sign_in_as);
  $("signin-name").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signInAs($("signin-name-input").value.trim());
  });
  $("signin-token").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signInWith($("signin-token-input").value.trim(), false);
  });
  $("signout").addEventListener("click", signOut);
  wireUi();
  const saved = sessionStorage.getItem("chatd.token");
  if (saved) signInWith(saved, sessionStorage.getItem("chatd.byName") === "1");
  else showSignIn("");
}

function showSignIn(message) {
  show($("workspace"), false);
  show($("signout"), false);
  show($("signin"), true);
  $("me").textContent = "";
  $("signin-error").textContent = message;
  (state.info.sign_in_as ? $("signin-name-input") : $("signin-token-input")).focus();
}

async function mint(name) {
  const answer = await publicJson("POST", "/console/token", { user_id: name });
  return answer.token;
}

async function signInAs(name) {
  if (!name) return;
  try {
    signInWith(await mint(name), true);
  } catch (err) {
    $("signin-error").textContent = err.message;
  }
}

async function renewToken() {
  // A token from "sign in as NAME" lives an hour: mint the next one.
  if (!state.byName || !state.user) {
    signOut("Your token was refused or has expired: sign in again.");
    return false;
  }
  try {
    state.token = await mint(state.user);
    sessionStorage.setItem("chatd.token", state.token);
    if (state.socket) state.socket.auth = { token: state.token };
    return true;
  } catch (err) {
    signOut("Sign in again.");
    return false;
  }
}

async function signInWith(token, byName) {
  if (!token) return;
  state.token = token;
  state.byName = byName;
  state.user = userOfToken(token);
  try {
    await loadChats(); // checks the token too
  } catch (err) {
    state.token = null;
    sessionStorage.removeItem("chatd.token");
    showSignIn(err.status === 401 ? "That token was refused: " + err.message : err.message);
    return;
  }
  sessionStorage.setItem("chatd.token", token);
  sessionStorage.setItem("chatd.byName", byName ? "1" : "0");
  show($("signin"), false);
  show($("workspace"), true);
  show($("signout"), true);
  $("me").textContent = state.user || "";
  $("signin-token-input").value = "";
  await detectFeatures();
  connect();
  const last = sessionStorage.getItem("chatd.open");
  if (last && state.chats.has(last)) openChat(last);
}

function signOut(message) {
  sessionStorage.clear();
  if (state.socket) {
    state.socket.off();
    state.socket.disconnect();
    state.socket = null;
  }
  state.token = null;
  state.open = null;
  state.chats.clear();
  clear($("chat-list"));
  closePanel();
  showChat(false);
  setConn("offline", "offline");
  showSignIn(typeof message === "string" ? message : "");
}

// Search, mentions and direct chats (API.md version 2) are offered when this
// chatd has them: its OpenAPI document lists them. Asking the document, not
// the routes, means an older chatd costs no 404 (and no console error).
async function detectFeatures() {
  try {
    const doc = await publicJson("GET", "/openapi.json");
    const paths = doc.paths || {};
    state.features = {
      search: "/search" in paths,
      mentions: "/mentions" in paths,
      direct: Object.keys(paths).some((p) => p.startsWith("/direct/")),
    };
  } catch (err) {
    state.features = { search: false, mentions: false, direct: false };
  }
  show($("search-form"), state.features.search);
  show($("mentions-btn"), state.features.mentions);
  show($("direct-form"), state.features.direct);
}

// -- the socket -------------------------------------------------------------

function connect() {
  setConn("connecting", "connecting...");
  const socket = window.io({ auth: { token: state.token }, transports: ["websocket", "polling"] });
  state.socket = socket;
  socket.on("connect", onConnect);
  socket.on("disconnect", (reason) => {
    setConn("reconnecting", "reconnecting...");
    if (reason === "io server disconnect") socket.connect(); // chatd closed it: come back
  });
  socket.on("connect_error", async (err) => {
    setConn("reconnecting", "reconnecting...");
    if (err && err.message === "unauthorized" && (await renewToken())) socket.connect();
  });
  socket.on("new-message", (m) => onMessage(m, true));
  socket.on("message-updated", (m) => onMessage(m, false));
  socket.on("message-deleted", onDeleted);
  socket.on("typing", onTyping);
  socket.on("read", onRead);
  socket.on("presence", onPresence);
  socket.on("chat-added", (ev) => onChatAdded(ev.chat));
  socket.on("chat-removed", (ev) => onChatRemoved(ev.chat_id));
  socket.on("mention", onMention);
}

function emit(event, payload) {
  return new Promise((resolve, reject) => {
    if (!state.socket || !state.socket.connected) {
      reject(new ApiError(0, "offline", "not connected"));
      return;
    }
    state.socket.timeout(10000).emit(event, payload, (err, ack) => {
      if (err) reject(new ApiError(0, "timeout", "chatd did not answer"));
      else if (ack && ack.ok === false) reject(new ApiError(0, ack.error.code, ack.error.message));
      else resolve(ack);
    });
  });
}

// After every (re)connect: the chat list again (unread counts), every chat's
// room (their events), and the open chat caught up exactly from the last
// version applied, so nothing sent or changed meanwhile is missing or doubled.
async function onConnect() {
  setConn("online", "online");
  try {
    await loadChats();
    // The open chat first (its catch-up must not queue behind the others),
    // then the most recently active ones, for live unread counts. Not all:
    // someone in hundreds of chats would send hundreds of joins per reconnect.
    if (state.open) await catchUp(state.open);
    let joined = 0;
    for (const id of state.chats.keys()) {
      if (joined >= LIVE_CHATS) break;
      if (state.open && state.open.id === id) continue;
      joined += 1;
      emit("join-chat", id).catch(() => {});
    }
  } catch (err) {
    failed(err);
  }
}

async function catchUp(view) {
  const ack = await emit("join-chat", { chat_id: view.id, since_version: view.version });
  if (state.open !== view) return;
  let changed = ack.changed || [];
  let hasMore = ack.has_more;
  for (;;) {
    for (const m of changed) apply(view, m);
    if (!hasMore) break;
    const page = await api.get(
      `/chats/${enc(view.id)}/changes?since_version=${view.version}&limit=500`
    );
    if (state.open !== view) return;
    changed = page.messages;
    hasMore = page.has_more;
  }
  afterChange(view);
  // Joined and caught up: live events for this chat reach the page from now on.
  $("chat-view").dataset.synced = view.id;
}

// -- the chat list ----------------------------------------------------------

async function loadChats() {
  const { chats } = await api.get("/chats");
  state.chats = new Map(chats.map((c) => [c.id, c]));
  renderChats();
  for (const chat of chats) nameDirect(chat);
}

// A direct chat is shown by the other member's name: fetch its members when
// the list item came without them.
async function nameDirect(chat) {
  if (chat.kind !== "direct" || chat.members) return;
  try {
    const full = await api.get(`/chats/${enc(chat.id)}`);
    const item = state.chats.get(chat.id);
    if (item) {
      item.members = full.members;
      renderChats();
    }
  } catch (err) {
    // shown as "direct chat" then
  }
}

function renderChats() {
  const list = clear($("chat-list"));
  for (const chat of state.chats.values()) {
    const open = state.open && state.open.id === chat.id;
    const unread = open ? 0 : chat.unread_count || 0;
    const mentions = open ? 0 : chat.unread_mentions || 0;
    const last = chat.last_message;
    list.append(
      h("li", { class: open ? "open" : "", "data-chat": chat.id },
        h("button", { type: "button", class: "chat-item", onclick: () => openChat(chat.id) },
          h("span", { class: "chat-name" }, h("bdi", {}, chatName(chat))),
          mentions ? h("span", { class: "badge mention", title: "unread mentions" }, `@${mentions}`) : null,
          unread ? h("span", { class: "badge", title: "unread messages" }, String(unread)) : null,
          h("span", { class: "chat-last" },
            last ? h("bdi", {}, `${last.sender_id}: ${last.content}`) : "no messages yet"),
        ),
      ),
    );
  }
  if (!state.chats.size) list.append(h("li", { class: "none" }, "No chats yet."));
}

function onChatAdded(chat) {
  if (!chat) return;
  const had = state.chats.get(chat.id);
  state.chats.set(chat.id, { unread_count: 0, last_message: null, ...had, ...chat });
  renderChats();
  nameDirect(state.chats.get(chat.id));
  emit("join-chat", chat.id).catch(() => {});
}

function onChatRemoved(chatId) {
  state.chats.delete(chatId);
  if (state.open && state.open.id === chatId) {
    state.open = null;
    sessionStorage.removeItem("chatd.open");
    showChat(false);
    toast("You are no longer a member of that chat.");
  }
  renderChats();
}

function onMention(ev) {
  const chat = ev && state.chats.get(ev.chat_id);
  if (chat && !(state.open && state.open.id === ev.chat_id)) {
    chat.unread_mentions = (chat.unread_mentions || 0) + 1;
    renderChats();
  }
}

// -- one chat ---------------------------------------------------------------

function showChat(visible) {
  show($("chat-view"), visible);
  show($("chat-empty"), !visible);
  document.body.classList.toggle("in-chat", visible);
  show($("back"), visible);
}

async function openChat(chatId) {
  const view = {
    id: chatId, chat: null, messages: new Map(), version: 0, oldest: null, newest: 0,
    hasMore: false, readSent: 0,
  };
  state.open = view;
  delete $("chat-view").dataset.synced;
  sessionStorage.setItem("chatd.open", chatId);
  setMode(null);
  closePanel();
  clear($("messages"));
  $("typing").textContent = "";
  state.typing.clear();
  showChat(true);
  renderChats();
  try {
    const chat = await api.get(`/chats/${enc(chatId)}`);
    if (state.open !== view) return;
    view.chat = chat;
    view.version = chat.version || 0;
    renderHead(view);
    const page = await api.get(`/chats/${enc(chatId)}/messages?limit=50&include_deleted=true`);
    if (state.open !== view) return;
    view.hasMore = page.has_more;
    for (const m of page.messages) apply(view, m, { fromPage: true });
    // Join with the chat's version as it was before the page: whatever
    // changed since arrives in the ack, whatever changes later as events.
    if (state.socket && state.socket.connected) await catchUp(view);
    afterChange(view, true);
    $("compose").focus();
  } catch (err) {
    failed(err);
  }
}

function renderHead(view) {
  const chat = view.chat;
  $("chat-title").textContent = chatName(chat);
  const online = state.online.get(view.id) || new Set();
  const list = clear($("members"));
  for (const m of chat.members || []) {
    const on = m.user_id === state.user || online.has(m.user_id);
    list.append(
      h("li", { class: on ? "online" : "", title: `${m.role}${on ? ", online" : ""}`, "data-user": m.user_id },
        h("span", { class: "dot", "aria-hidden": "true" }), h("bdi", {}, m.user_id),
        m.role !== "member" ? h("small", {}, ` ${m.role}`) : null),
    );
  }
  const admin = ["owner", "admin"].includes(myRole(chat));
  show($("add-member"), admin && chat.kind !== "direct");
}

// Messages are kept by id; each carries its version, and an older version of
// a message never replaces a newer one: events, acks and pages may overlap.
function apply(view, m, { fromPage = false } = {}) {
  if (m.version && m.version > view.version && !fromPage) view.version = m.version;
  const known = view.messages.get(m.id);
  if (known && (known.version || 0) >= (m.version || 0) && !(m.deleted && !known.deleted)) return;
  if (!known && view.oldest !== null && m.seq < view.oldest) return; // above the loaded page
  view.messages.set(m.id, m);
  if (view.oldest === null || m.seq < view.oldest) view.oldest = m.seq;
  if (m.seq > view.newest) view.newest = m.seq;
  placeMessage(view, m);
  if (state.panel && state.panel.kind === "thread" && m.reply_to === state.panel.message.id) {
    refreshPanel();
  }
}

function placeMessage(view, m) {
  const list = $("messages");
  const node = renderMessage(view, m);
  const old = list.querySelector(`li[data-id="${m.id}"]`);
  if (old) {
    old.replaceWith(node);
    return;
  }
  let before = null;
  for (const child of list.children) {
    if (Number(child.dataset.seq) > m.seq) {
      before = child;
      break;
    }
  }
  list.insertBefore(node, before);
}

function afterChange(view, scrollToEnd = false) {
  if (state.open !== view) return;
  show($("older"), view.hasMore);
  renderSeen(view);
  const scroller = $("scroller");
  const nearEnd = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
  if (scrollToEnd || nearEnd) scroller.scrollTop = scroller.scrollHeight;
  markRead(view);
}

function onMessage(m, isNew) {
  const view = state.open;
  if (view && view.id === m.chat_id) {
    const gap = isNew && view.newest && m.seq > view.newest + 1;
    const from = view.newest;
    apply(view, m);
    if (m.sender_id !== state.user) clearTyping(m.sender_id);
    if (gap) fillGap(view, from);
    afterChange(view);
  }
  const chat = state.chats.get(m.chat_id);
  if (chat && isNew) {
    if (!m.deleted) chat.last_message = m;
    if (m.sender_id !== state.user && !(view && view.id === m.chat_id)) {
      chat.unread_count = (chat.unread_count || 0) + 1;
    }
    // most recently active first
    state.chats.delete(m.chat_id);
    state.chats = new Map([[m.chat_id, chat], ...state.chats]);
    renderChats();
  }
}

async function fillGap(view, after) {
  try {
    const page = await api.get(
      `/chats/${enc(view.id)}/messages?after_seq=${after}&limit=200&include_deleted=true`
    );
    if (state.open !== view) return;
    for (const m of page.messages) apply(view, m);
    afterChange(view);
  } catch (err) {
    failed(err);
  }
}

function onDeleted(ev) {
  const view = state.open;
  if (!view || view.id !== ev.chat_id) return;
  const known = view.messages.get(ev.id);
  if (known) {
    apply(view, { ...known, content: null, deleted: true, mentions: [], reactions: [],
      pinned: false, version: ev.version || (known.version || 0) + 1 });
  } else if (ev.version && ev.version > view.version) {
    view.version = ev.version;
  }
  afterChange(view);
}

async function loadOlder() {
  const view = state.open;
  if (!view || !view.hasMore || view.loadingOlder) return;
  view.loadingOlder = true;
  const scroller = $("scroller");
  const fromEnd = scroller.scrollHeight - scroller.scrollTop;
  try {
    const page = await api.get(
      `/chats/${enc(view.id)}/messages?before_seq=${view.oldest}&limit=50&include_deleted=true`
    );
    if (state.open !== view) return;
    view.hasMore = page.has_more;
    const keep = view.oldest;
    view.oldest = null; // let the older page in
    for (const m of page.messages) apply(view, m, { fromPage: true });
    if (view.oldest === null) view.oldest = keep;
    show($("older"), view.hasMore);
    scroller.scrollTop = scroller.scrollHeight - fromEnd;
  } catch (err) {
    failed(err);
  } finally {
    view.loadingOlder = false;
  }
}

// -- one message ------------------------------------------------------------

// The text with @mentions marked: chatd says who is mentioned (the message's
// `mentions`), the console only finds where.
function contentNodes(m) {
  const text = m.content || "";
  const named = new Set(m.mentions || []);
  if (!named.size) return [text];
  const out = [];
  const re = /(^|\s)@([^\s.,:;!?)]+)/g;
  let at = 0;
  let match;
  while ((match = re.exec(text)) !== null) {
    const name = match[2];
    if (!named.has(name)) continue;
    const start = match.index + match[1].length;
    out.push(text.slice(at, start));
    out.push(h("span", { class: name === state.user ? "mention me" : "mention" }, `@${name}`));
    at = start + 1 + name.length;
  }
  out.push(text.slice(at));
  return out;
}

function renderMessage(view, m, { inPanel = false } = {}) {
  const mine = m.sender_id === state.user;
  const admin = view && view.chat && ["owner", "admin"].includes(myRole(view.chat));
  const mentionsMe = (m.mentions || []).includes(state.user);
  const cls = ["msg", mine ? "mine" : "", m.deleted ? "deleted" : "", mentionsMe ? "mentions-me" : ""];
  const node = h("li", { class: cls.join(" "), "data-id": m.id, "data-seq": m.seq, tabindex: "0" });
  const parent = m.reply_to && view ? view.messages.get(m.reply_to) : null;
  append(node, [
    h("div", { class: "meta" },
      h("bdi", { class: "sender" }, m.sender_id),
      h("time", { datetime: m.created_at, title: m.created_at }, timeOf(m.created_at)),
      m.edited_at && !m.deleted ? h("button", { type: "button", class: "link edited", title: "edit history",
        onclick: () => showHistory(m) }, "(edited)") : null,
      m.pinned ? h("span", { class: "pin-mark", title: "pinned" }, "pinned") : null,
    ),
    m.reply_to && !inPanel ? h("div", { class: "reply-to" }, "↪ ",
      parent ? h("bdi", {}, `${parent.sender_id}: ${parent.content || "(deleted)"}`) : "a reply") : null,
    m.deleted
      ? h("p", { class: "content gone" }, "message deleted")
      : h("p", { class: "content", dir: "auto" }, h("bdi", {}, ...contentNodes(m))),
  ]);
  if (m.deleted) return node;
  const reactions = h("div", { class: "reactions" });
  for (const r of m.reactions || []) {
    const meToo = (r.users || []).includes(state.user);
    reactions.append(
      h("button", { type: "button", class: meToo ? "reaction me" : "reaction", "aria-pressed": meToo ? "true" : "false",
        title: (r.users || []).join(", "), onclick: () => react(m, r.emoji, meToo) },
        h("bdi", {}, r.emoji), ` ${r.count}`),
    );
  }
  if ((m.reactions || []).length) node.append(reactions);
  if (!inPanel && m.reply_count) {
    node.append(h("button", { type: "button", class: "link replies", onclick: () => openThread(m) },
      `${m.reply_count} ${m.reply_count === 1 ? "reply" : "replies"}`));
  }
  const actions = h("div", { class: "actions" });
  for (const emoji of QUICK_REACTIONS) {
    const meToo = (m.reactions || []).some((r) => r.emoji === emoji && (r.users || []).includes(state.user));
    actions.append(h("button", { type: "button", class: "icon react", title: `react ${emoji}`,
      "data-emoji": emoji, onclick: () => react(m, emoji, meToo) }, emoji));
  }
  if (!inPanel) actions.append(h("button", { type: "button", class: "link", onclick: () => openThread(m) }, "Reply"));
  if (mine) actions.append(h("button", { type: "button", class: "link", onclick: () => startEdit(m) }, "Edit"));
  if (mine || admin) {
    actions.append(h("button", { type: "button", class: "link danger", onclick: (ev) => deleteMessage(m, ev.currentTarget) }, "Delete"));
  }
  if (admin) {
    actions.append(h("button", { type: "button", class: "link", onclick: () => pin(m) }, m.pinned ? "Unpin" : "Pin"));
  }
  node.append(actions);
  return node;
}

function renderSeen(view) {
  for (const old of $("messages").querySelectorAll(".seen")) old.remove();
  if (!view.chat) return;
  const mine = [...view.messages.values()].filter((m) => m.sender_id === state.user && !m.deleted);
  if (!mine.length) return;
  const last = mine.reduce((a, b) => (a.seq > b.seq ? a : b));
  const seen = (view.chat.members || [])
    .filter((m) => m.user_id !== state.user && m.last_read_seq >= last.seq)
    .map((m) => m.user_id);
  if (!seen.length) return;
  const node = $("messages").querySelector(`li[data-id="${last.id}"]`);
  if (node) node.append(h("div", { class: "seen" }, "Seen by ", h("bdi", {}, seen.join(", "))));
}

// -- actions ----------------------------------------------------------------

async function send(text) {
  const view = state.open;
  if (!view) return;
  const content = text.trim();
  if (!content) return;
  const mode = state.mode;
  try {
    if (mode && mode.kind === "edit") {
      apply(view, await api.patch(`/messages/${mode.message.id}`, { content }));
    } else {
      const body = { chat_id: view.id, content, client_id: clientId() };
      if (mode && mode.kind === "reply") body.reply_to = mode.message.id;
      const ack = await emit("send-message", body).catch((err) => {
        if (err.code !== "offline" && err.code !== "timeout") throw err;
        // Not connected: the same send over REST (client_id keeps it single).
        return api.post(`/chats/${enc(view.id)}/messages`, {
          content, client_id: body.client_id, reply_to: body.reply_to,
        }).then((message) => ({ message }));
      });
      apply(view, ack.message);
    }
    setMode(null);
    $("compose").value = "";
    autosize($("compose"));
    afterChange(view, true);
  } catch (err) {
    failed(err);
  }
}

async function react(m, emoji, remove) {
  try {
    const ack = await emit("react", { message_id: m.id, emoji, remove });
    if (state.open && ack.message) apply(state.open, ack.message);
  } catch (err) {
    failed(err);
  }
}

async function deleteMessage(m, button) {
  if (button.dataset.armed !== "1") {
    button.dataset.armed = "1";
    button.textContent = "Delete?";
    setTimeout(() => {
      button.dataset.armed = "";
      button.textContent = "Delete";
    }, 4000);
    return;
  }
  try {
    await api.del(`/messages/${m.id}`);
  } catch (err) {
    failed(err);
  }
}

async function pin(m) {
  const view = state.open;
  try {
    const path = `/chats/${enc(view.id)}/pins/${m.id}`;
    apply(view, m.pinned ? await api.del(path) : await api.put(path));
    if (state.panel && state.panel.kind === "pins") showPins();
  } catch (err) {
    failed(err);
  }
}

function startEdit(m) {
  setMode({ kind: "edit", message: m });
  const box = $("compose");
  box.value = m.content || "";
  autosize(box);
  box.focus();
}

function setMode(mode) {
  state.mode = mode;
  show($("composer-mode"), !!mode);
  $("composer-mode-text").textContent = mode
    ? `${mode.kind === "edit" ? "Editing" : "Replying to"} ${mode.message.sender_id}: ${mode.message.content || ""}`
    : "";
  if (!mode) $("compose").placeholder = "Message (Enter sends, Shift+Enter: new line)";
}

function markRead(view) {
  if (document.visibilityState !== "visible" || !view.chat || !state.socket || !state.socket.connected) return;
  const me = (view.chat.members || []).find((m) => m.user_id === state.user);
  const seq = view.newest;
  if (!me || seq <= Math.max(me.last_read_seq || 0, view.readSent)) return;
  view.readSent = seq;
  emit("mark-read", { chat_id: view.id, seq }).catch(() => {});
  const chat = state.chats.get(view.id);
  if (chat) chat.unread_count = 0;
}

function onRead(ev) {
  const view = state.open;
  if (!view || !view.chat || view.id !== ev.chat_id) return;
  const member = (view.chat.members || []).find((m) => m.user_id === ev.user_id);
  if (member && ev.seq > (member.last_read_seq || 0)) member.last_read_seq = ev.seq;
  renderSeen(view);
}

function onTyping(ev) {
  const view = state.open;
  if (!view || view.id !== ev.chat_id || ev.user_id === state.user) return;
  clearTimeout(state.typing.get(ev.user_id));
  state.typing.set(ev.user_id, setTimeout(() => clearTyping(ev.user_id), TYPING_SHOWN_MS));
  renderTyping();
}

function clearTyping(user) {
  clearTimeout(state.typing.get(user));
  state.typing.delete(user);
  renderTyping();
}

function renderTyping() {
  const names = [...state.typing.keys()];
  $("typing").textContent = names.length
    ? `${names.join(", ")} ${names.length === 1 ? "is" : "are"} typing...`
    : "";
}

function onPresence(ev) {
  if (!state.online.has(ev.chat_id)) state.online.set(ev.chat_id, new Set());
  const set = state.online.get(ev.chat_id);
  if (ev.online) set.add(ev.user_id);
  else set.delete(ev.user_id);
  if (state.open && state.open.id === ev.chat_id && state.open.chat) renderHead(state.open);
}

// -- the side panel: thread, search, mentions, pins, edit history -----------

function openPanel(kind, title, message) {
  state.panel = { kind, message };
  $("panel-title").textContent = title;
  show($("panel"), true);
  show($("thread-composer"), kind === "thread");
  document.body.classList.add("in-panel");
}

function closePanel() {
  state.panel = null;
  show($("panel"), false);
  clear($("panel-list"));
  document.body.classList.remove("in-panel");
}

function panelRows(messages, { withChat = false, onpick } = {}) {
  const list = clear($("panel-list"));
  for (const m of messages) {
    const node = renderMessage(state.open, m, { inPanel: true });
    if (withChat) {
      const chat = state.chats.get(m.chat_id);
      node.prepend(h("div", { class: "from-chat" }, "in ", h("bdi", {}, chat ? chatName(chat) : m.chat_id)));
    }
    if (onpick) {
      node.classList.add("pick");
      node.addEventListener("click", (ev) => {
        if (ev.target.closest("button")) return;
        onpick(m);
      });
      node.addEventListener("keydown", (ev) => { if (ev.key === "Enter") onpick(m); });
    }
    list.append(node);
  }
  if (!messages.length) list.append(h("li", { class: "none" }, "Nothing here."));
}

async function openThread(m) {
  openPanel("thread", "Thread", m);
  await refreshPanel();
  $("thread-compose").focus();
}

async function refreshPanel() {
  const panel = state.panel;
  if (!panel || panel.kind !== "thread") return;
  try {
    const page = await api.get(`/messages/${panel.message.id}/replies?limit=200`);
    if (state.panel !== panel) return;
    const parent = state.open.messages.get(panel.message.id) || panel.message;
    panelRows([parent, ...page.messages]);
  } catch (err) {
    failed(err);
  }
}

async function showPins() {
  const view = state.open;
  openPanel("pins", "Pinned");
  try {
    const page = await api.get(`/chats/${enc(view.id)}/pins`);
    panelRows(page.messages, { onpick: (m) => focusMessage(m) });
  } catch (err) {
    failed(err);
  }
}

async function showHistory(m) {
  openPanel("history", "Edit history");
  try {
    const { versions } = await api.get(`/messages/${m.id}/history`);
    const list = clear($("panel-list"));
    for (const v of versions) {
      list.append(h("li", { class: "msg" }, h("div", { class: "meta" }, h("time", {}, timeOf(v.at))),
        h("p", { class: "content", dir: "auto" }, h("bdi", {}, v.content))));
    }
  } catch (err) {
    failed(err);
  }
}

async function search(q) {
  if (!q.trim()) return;
  openPanel("search", `Search: ${q}`);
  try {
    const page = await api.get(`/search?q=${enc(q)}&limit=50`);
    panelRows(page.messages, { withChat: true, onpick: (m) => focusMessage(m) });
  } catch (err) {
    failed(err);
  }
}

async function showMentions() {
  openPanel("mentions", "Mentions");
  try {
    const page = await api.get("/mentions?limit=50");
    panelRows(page.messages, { withChat: true, onpick: (m) => focusMessage(m) });
  } catch (err) {
    failed(err);
  }
}

async function focusMessage(m) {
  if (!state.open || state.open.id !== m.chat_id) await openChat(m.chat_id);
  const node = $("messages").querySelector(`li[data-id="${m.id}"]`);
  if (node) {
    node.scrollIntoView({ block: "center" });
    node.classList.add("flash");
    setTimeout(() => node.classList.remove("flash"), 1500);
  }
}

// -- @ completion -------------------------------------------------------------

const complete = { items: [], index: 0, start: -1 };

function updateCompletion() {
  const box = $("compose");
  const before = box.value.slice(0, box.selectionStart);
  const match = /(^|\s)@([^\s@]*)$/.exec(before);
  const members = state.open && state.open.chat ? state.open.chat.members || [] : [];
  if (!match) return hideCompletion();
  const prefix = match[2].toLowerCase();
  complete.items = members.map((m) => m.user_id)
    .filter((u) => u !== state.user && u.toLowerCase().startsWith(prefix)).slice(0, 8);
  complete.start = before.length - match[2].length - 1;
  complete.index = 0;
  // Nothing to offer when the name is already written out in full.
  const exact = complete.items.length === 1 && complete.items[0].toLowerCase() === prefix;
  if (!complete.items.length || exact) return hideCompletion();
  renderCompletion();
  return undefined;
}

function renderCompletion() {
  const list = clear($("complete"));
  complete.items.forEach((u, i) => {
    list.append(h("li", { role: "option", class: i === complete.index ? "active" : "",
      "aria-selected": i === complete.index ? "true" : "false",
      onmousedown: (ev) => { ev.preventDefault(); pickCompletion(i); } }, h("bdi", {}, `@${u}`)));
  });
  show(list, true);
}

function hideCompletion() {
  complete.items = [];
  show($("complete"), false);
}

function pickCompletion(i) {
  const box = $("compose");
  const user = complete.items[i];
  const rest = box.value.slice(box.selectionStart);
  box.value = `${box.value.slice(0, complete.start)}@${user} ${rest.replace(/^\S*/, "")}`;
  const caret = complete.start + user.length + 2;
  box.setSelectionRange(caret, caret);
  hideCompletion();
}

// -- wiring -------------------------------------------------------------------

function autosize(box) {
  box.style.height = "auto";
  box.style.height = `${Math.min(box.scrollHeight, 160)}px`;
}

function wireUi() {
  const box = $("compose");
  box.addEventListener("keydown", (ev) => {
    if (complete.items.length) {
      if (ev.key === "ArrowDown" || ev.key === "ArrowUp") {
        ev.preventDefault();
        const n = complete.items.length;
        complete.index = (complete.index + (ev.key === "ArrowDown" ? 1 : n - 1)) % n;
        renderCompletion();
        return;
      }
      if (ev.key === "Enter" || ev.key === "Tab") {
        ev.preventDefault();
        pickCompletion(complete.index);
        return;
      }
      if (ev.key === "Escape") {
        hideCompletion();
        return;
      }
    }
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send(box.value);
    } else if (ev.key === "Escape" && state.mode) {
      setMode(null);
      box.value = "";
    } else if (ev.key === "ArrowUp" && !box.value && state.open) {
      const mine = [...state.open.messages.values()].filter((m) => m.sender_id === state.user && !m.deleted);
      if (mine.length) {
        ev.preventDefault();
        startEdit(mine.reduce((a, b) => (a.seq > b.seq ? a : b)));
      }
    }
  });
  box.addEventListener("input", () => {
    autosize(box);
    updateCompletion();
    const now = Date.now();
    if (state.open && box.value && now - state.lastTypingSent > TYPING_EVERY_MS && state.socket && state.socket.connected) {
      state.lastTypingSent = now;
      state.socket.emit("typing", { chat_id: state.open.id });
    }
  });
  box.addEventListener("blur", () => setTimeout(hideCompletion, 100));
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    send(box.value);
  });
  $("composer-cancel").addEventListener("click", () => {
    setMode(null);
    box.value = "";
  });

  const threadBox = $("thread-compose");
  const sendReply = async () => {
    const panel = state.panel;
    const content = threadBox.value.trim();
    if (!panel || panel.kind !== "thread" || !content) return;
    try {
      const ack = await emit("send-message", {
        chat_id: state.open.id, content, reply_to: panel.message.id,
        client_id: clientId(),
      });
      threadBox.value = "";
      apply(state.open, ack.message);
      afterChange(state.open);
      await refreshPanel();
    } catch (err) {
      failed(err);
    }
  };
  threadBox.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      sendReply();
    } else if (ev.key === "Escape") {
      closePanel();
      box.focus();
    }
  });
  $("thread-composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sendReply();
  });
  $("panel-close").addEventListener("click", closePanel);
  $("pins-btn").addEventListener("click", showPins);
  $("mentions-btn").addEventListener("click", showMentions);
  $("older").addEventListener("click", loadOlder);
  $("scroller").addEventListener("scroll", () => {
    if ($("scroller").scrollTop < 40) loadOlder();
  });
  $("back").addEventListener("click", () => {
    showChat(false);
    closePanel();
  });
  $("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    search($("search-input").value);
  });
  $("new-chat").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const members = $("new-chat-members").value.split(",").map((s) => s.trim()).filter(Boolean);
    try {
      const chat = await api.post("/chats", {
        title: $("new-chat-title").value.trim(),
        visibility: $("new-chat-public").checked ? "public" : "private",
        members,
      });
      $("new-chat").reset();
      $("new-chat-box").open = false;
      onChatAdded(chat);
      openChat(chat.id);
    } catch (err) {
      failed(err);
    }
  });
  $("direct-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const user = $("direct-input").value.trim();
    if (!user) return;
    try {
      const chat = await api.put(`/direct/${enc(user)}`);
      $("direct-input").value = "";
      onChatAdded(chat);
      openChat(chat.id);
    } catch (err) {
      failed(err);
    }
  });
  $("add-member").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const view = state.open;
    const user = $("add-member-input").value.trim();
    if (!view || !user) return;
    try {
      await api.put(`/chats/${enc(view.id)}/members/${enc(user)}`);
      $("add-member-input").value = "";
      view.chat = await api.get(`/chats/${enc(view.id)}`);
      renderHead(view);
    } catch (err) {
      failed(err);
    }
  });
  document.addEventListener("visibilitychange", () => {
    if (state.open) markRead(state.open);
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "/" && document.activeElement === document.body && state.features.search) {
      ev.preventDefault();
      $("search-input").focus();
    }
  });
}

start();
