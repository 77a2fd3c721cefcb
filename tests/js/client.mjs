// A frontend's socket, as the official socket.io-client v4 does it, driven by
// tests/test_js_client.py. Prints one JSON object per line on stdout:
//   {"type":"connect"} {"type":"joined","ack":{...}} {"type":"message","via":"event"|"missed","message":{...}}
//   {"type":"disconnect","reason":...} {"type":"connect_error","message":...} {"type":"ack","ack":{...}}
// Reads commands as JSON lines on stdin: {"cmd":"send","content":...,"client_id"?:...}, {"cmd":"exit"}.
// Environment: CHATD_URL, CHATD_TOKEN, CHAT_ID, TRANSPORTS (comma-separated, optional).
import { io } from "socket.io-client";
import { createInterface } from "node:readline";

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const chatId = process.env.CHAT_ID;
const seen = new Set();

// The highest seq up to which this client has every message: what it asks
// for on (re)join, as a frontend that orders by seq would.
function contiguous() {
  let n = 0;
  while (seen.has(n + 1)) n += 1;
  return n;
}

function take(message, via) {
  if (message.chat_id !== chatId || seen.has(message.seq)) return;
  seen.add(message.seq);
  out({ type: "message", via, message });
}

const options = {
  auth: { token: process.env.CHATD_TOKEN },
  reconnectionDelay: 200,
  reconnectionDelayMax: 1000,
  timeout: 5000,
};
if (process.env.TRANSPORTS) options.transports = process.env.TRANSPORTS.split(",");
const socket = io(process.env.CHATD_URL, options);

socket.on("connect", () => {
  out({ type: "connect", transport: socket.io.engine.transport.name });
  if (!chatId) return;
  const payload = seen.size ? { chat_id: chatId, since_seq: contiguous() } : { chat_id: chatId };
  socket.emit("join-chat", payload, (ack) => {
    out({ type: "joined", since_seq: payload.since_seq ?? null, ack });
    if (ack && ack.ok) for (const m of ack.missed) take(m, "missed");
  });
});
socket.on("new-message", (message) => take(message, "event"));
socket.on("disconnect", (reason) => out({ type: "disconnect", reason }));
socket.on("connect_error", (err) => out({ type: "connect_error", message: err.message }));

const rl = createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const cmd = JSON.parse(line);
  if (cmd.cmd === "send") {
    socket.emit("send-message", { chat_id: chatId, content: cmd.content, client_id: cmd.client_id },
      (ack) => out({ type: "ack", ack }));
  } else if (cmd.cmd === "exit") {
    socket.close();
    process.exit(0);
  }
});
rl.on("close", () => { socket.close(); process.exit(0); });
