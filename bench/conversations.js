#!/usr/bin/env node
'use strict';
/*
 * API.md version 2 scenarios for chatd, next to the shared load generator's
 * (it uses that kit's modules: bench/run.sh sets CHATD_BENCH_KIT).
 *
 *   node bench/conversations.js --url URL --secret S --scenario react|edit|changes|search
 *        [--pid PID] [--label L] [--out FILE.jsonl] [--duration 10] [--concurrency 32]
 *   node bench/conversations.js --summarize FILE.jsonl [FILE.jsonl ...]
 *
 * react:   32 users react and unreact (PUT / DELETE /messages/{id}/reactions/{emoji})
 *          on the newest 50 messages of one chat; then checks that every message's
 *          aggregate is exact (count and users against what each user last did).
 * edit:    the same 32 users editing their own messages among the newest 50 of one
 *          chat (PATCH /messages/{id}): what a reaction is measured against.
 * changes: a chat with 500 changes (sends, edits, reactions); readers catch up
 *          with GET /chats/{id}/changes?since_version=0&limit=500, and each answer
 *          is checked (500 messages, ascending versions, has_more false).
 * search:  32 members of one chat of 2,000 messages (words from a 64-word
 *          vocabulary, 6 per message) search it with GET /search?q=<two words>
 *          (newest 20, all the caller's chats); every answer is checked: at most
 *          20 messages, newest first, each containing both words.
 * Prints one JSON line per run (like bench.js); loopback targets only.
 */

const fs = require('node:fs');
const path = require('node:path');
const { performance } = require('node:perf_hooks');

const KIT = path.resolve(process.env.CHATD_BENCH_KIT || path.join(__dirname, '.kit', 'load'));
const L = require(path.join(KIT, 'lib'));
const { Pool } = require(path.join(KIT, 'node_modules', 'undici'));

const { log, Samples, latencyStats, r1, r2 } = L;

const argv = process.argv.slice(2);
if (argv[0] === '--summarize') {
  summarize(argv.slice(1));
  process.exit(0);
}
const o = L.parseArgs(argv, {
  url: 'http://127.0.0.1:8080', secret: process.env.ACCESS_TOKEN_SECRET || '', scenario: '',
  pid: 0, label: '', out: '', duration: 10, warmup: 1, concurrency: 32, messages: 50,
  changes: 500, corpus: 2000,
});
L.assertLoopback(o.url);
if (!['react', 'edit', 'changes', 'search'].includes(o.scenario)) {
  console.error('conversations.js: --scenario must be react, edit, changes or search');
  process.exit(2);
}
const RUN = L.runId();
const tokenFor = L.tokenFactory(o.secret);
const tokens = new Map();
const tok = (u) => tokens.get(u) || (tokens.set(u, tokenFor(u)), tokens.get(u));
const pool = new Pool(o.url, { connections: Math.max(16, o.concurrency), pipelining: 1 });

async function api(method, p, user, body) {
  const headers = { authorization: `Bearer ${tok(user)}` };
  if (body !== undefined) headers['content-type'] = 'application/json';
  const r = await pool.request({ path: p, method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.body.text();
  let json;
  try { json = text ? JSON.parse(text) : undefined; } catch { json = undefined; }
  return { status: r.statusCode, json, text };
}

async function must(method, p, user, body, want) {
  const r = await api(method, p, user, body);
  if (r.status !== want) throw new Error(`setup: ${method} ${p} -> ${r.status} ${r.text.slice(0, 200)}`);
  return r.json;
}

function window() {
  const cpu = L.cpuSnapshot();
  return () => L.cpuBetween(cpu, L.cpuSnapshot(), o.pid || null);
}

async function timed(worker) {
  const lat = new Samples(1 << 16);
  let ok = 0; let bad = 0; let stop = false;
  const wStart = performance.now() + o.warmup * 1000;
  const wEnd = wStart + o.duration * 1000;
  let end = null;
  setTimeout(() => { end = window(); }, o.warmup * 1000);
  setTimeout(() => { stop = true; }, (o.warmup + o.duration) * 1000);
  await Promise.all(Array.from({ length: o.concurrency }, (_, i) => (async () => {
    let n = 0;
    while (!stop) {
      const a = performance.now();
      const good = await worker(i, n++);
      const b = performance.now();
      if (b >= wStart && b < wEnd) { lat.push(b - a); if (good) ok++; else bad++; }
    }
  })()));
  const cpu = end ? end() : null;
  return { lat, ok, bad, cpu, secs: o.duration };
}

async function scenarioReact() {
  const owner = `${RUN}-owner`;
  const users = Array.from({ length: o.concurrency }, (_, i) => `${RUN}-u${i}`);
  const chat = `${RUN}-react`;
  await must('POST', '/chats', owner, { id: chat, title: 'react', members: users }, 201);
  const ids = [];
  for (let k = 0; k < o.messages; k++) {
    ids.push((await must('POST', `/chats/${chat}/messages`, owner, { content: `m${k}` }, 201)).id);
  }
  const EMOJI = ['%F0%9F%91%8D', '%E2%9D%A4%EF%B8%8F', ':tada:'];
  const state = new Map(); // `${user}|${id}|${emoji}` -> on
  const res = await timed(async (i, n) => {
    const id = ids[(i * 7 + n * 13) % ids.length];
    const e = EMOJI[(i + n) % EMOJI.length];
    const key = `${users[i]}|${id}|${e}`;
    const on = !state.get(key);
    const r = await pool.request({
      path: `/messages/${id}/reactions/${e}`, method: on ? 'PUT' : 'DELETE',
      headers: { authorization: `Bearer ${tok(users[i])}` },
    });
    await r.body.dump();
    if (r.statusCode === 200) state.set(key, on);
    return r.statusCode === 200;
  });
  // Exactness: each message's counts against what each user last did.
  const page = await must('GET', `/chats/${chat}/messages?limit=${o.messages}`, owner, undefined, 200);
  let mismatches = 0;
  for (const m of page.messages) {
    for (const e of EMOJI) {
      const emoji = decodeURIComponent(e);
      const want = users.filter((u) => state.get(`${u}|${m.id}|${e}`)).length;
      const got = (m.reactions.find((x) => x.emoji === emoji) || { count: 0 }).count;
      if (want !== got) mismatches++;
    }
  }
  return finish(res, { messages: o.messages, aggregate_check: mismatches ? `FAIL ${mismatches}` : 'ok' });
}

async function scenarioEdit() {
  const owner = `${RUN}-owner`;
  const users = Array.from({ length: o.concurrency }, (_, i) => `${RUN}-u${i}`);
  const chat = `${RUN}-edit`;
  await must('POST', '/chats', owner, { id: chat, title: 'edit', members: users }, 201);
  const mine = users.map(() => []);
  for (let k = 0; k < o.messages; k++) {
    const i = k % users.length;
    mine[i].push((await must('POST', `/chats/${chat}/messages`, users[i], { content: `m${k}` }, 201)).id);
  }
  const res = await timed(async (i, n) => {
    const id = mine[i][n % mine[i].length];
    const r = await pool.request({
      path: `/messages/${id}`, method: 'PATCH',
      headers: { authorization: `Bearer ${tok(users[i])}`, 'content-type': 'application/json' },
      body: JSON.stringify({ content: `edit ${i} ${n}` }),
    });
    await r.body.dump();
    return r.statusCode === 200;
  });
  return finish(res, { messages: o.messages });
}

async function scenarioChanges() {
  const owner = `${RUN}-owner`;
  const readers = Array.from({ length: o.concurrency }, (_, i) => `${RUN}-r${i}`);
  const chat = `${RUN}-changes`;
  await must('POST', '/chats', owner, { id: chat, title: 'changes', members: readers }, 201);
  // 500 changes over 300 messages: 300 sends, 100 edits, 100 reactions.
  const ids = [];
  for (let k = 0; k < 300; k++) {
    ids.push((await must('POST', `/chats/${chat}/messages`, owner, { content: `m${k}` }, 201)).id);
  }
  for (let k = 0; k < 100; k++) await must('PATCH', `/messages/${ids[k]}`, owner, { content: `e${k}` }, 200);
  for (let k = 0; k < 100; k++) await must('PUT', `/messages/${ids[100 + k]}/reactions/:ok:`, owner, undefined, 200);
  const chatNow = await must('GET', `/chats/${chat}`, owner, undefined, 200);
  if (chatNow.version !== o.changes) throw new Error(`setup: version ${chatNow.version}, wanted ${o.changes}`);
  const res = await timed(async (i) => {
    const r = await pool.request({
      path: `/chats/${chat}/changes?since_version=0&limit=500`, method: 'GET',
      headers: { authorization: `Bearer ${tok(readers[i])}` },
    });
    const body = await r.body.text();
    if (r.statusCode !== 200) return false;
    const j = JSON.parse(body);
    return j.messages.length === 300 && j.has_more === false && j.version === o.changes;
  });
  return finish(res, { changes: o.changes, messages: 300 });
}

const VOCAB = Array.from({ length: 64 }, (_, i) => `w${String.fromCharCode(97 + (i % 26))}${String.fromCharCode(97 + ((i * 7) % 26))}${i}`);

async function scenarioSearch() {
  const owner = `${RUN}-owner`;
  const readers = Array.from({ length: o.concurrency }, (_, i) => `${RUN}-s${i}`);
  const chat = `${RUN}-search`;
  await must('POST', '/chats', owner, { id: chat, title: 'search', members: readers }, 201);
  // A deterministic corpus: message k holds 6 words picked by a small LCG.
  let x = 12345;
  const next = () => { x = (x * 1103515245 + 12345) % 2147483648; return x; };
  const texts = Array.from({ length: o.corpus }, () => Array.from({ length: 6 }, () => VOCAB[next() % VOCAB.length]).join(' '));
  for (let k = 0; k < texts.length; k += o.concurrency) {
    await Promise.all(texts.slice(k, k + o.concurrency).map((t) => must('POST', `/chats/${chat}/messages`, owner, { content: t }, 201)));
  }
  const res = await timed(async (i, n) => {
    const a = VOCAB[(i * 5 + n) % VOCAB.length];
    const b = VOCAB[(i * 11 + n * 3 + 1) % VOCAB.length];
    const r = await pool.request({
      path: `/search?q=${encodeURIComponent(`${a} ${b}`)}`, method: 'GET',
      headers: { authorization: `Bearer ${tok(readers[i])}` },
    });
    const body = await r.body.text();
    if (r.statusCode !== 200) return false;
    const j = JSON.parse(body);
    if (!Array.isArray(j.messages) || j.messages.length > 20) return false;
    for (let k = 0; k < j.messages.length; k++) {
      const words = j.messages[k].content.split(' ');
      if (!words.includes(a) || !words.includes(b)) return false;
      if (k && j.messages[k].seq >= j.messages[k - 1].seq) return false;
    }
    return true;
  });
  return finish(res, { corpus: o.corpus });
}

function finish(res, extra) {
  const st = latencyStats(res.lat);
  return {
    ok: res.bad === 0 && (extra.aggregate_check || 'ok') === 'ok',
    concurrency: o.concurrency,
    req_per_s: r1(res.ok / res.secs),
    p50_ms: st.p50_ms, p90_ms: st.p90_ms, p99_ms: st.p99_ms, max_ms: st.max_ms,
    failed: res.bad,
    ...extra,
    cpu: res.cpu,
  };
}

function summarize(files) {
  const rows = [];
  for (const f of files) {
    for (const line of fs.readFileSync(f, 'utf8').split('\n')) {
      if (!line.startsWith('{')) continue;
      const j = JSON.parse(line);
      if (['react', 'edit', 'changes', 'search'].includes(j.scenario)) rows.push({ ...j, label: String(j.label) });
    }
  }
  const median = (xs) => {
    const v = xs.filter((x) => typeof x === 'number').sort((a, b) => a - b);
    if (!v.length) return null;
    const m = v.length >> 1;
    return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
  };
  console.log('| scenario | label | runs | req/s | p50 ms | p90 ms | p99 ms | failed | check | server cores | pg cores |');
  console.log('|---|---|---|---|---|---|---|---|---|---|---|');
  const keys = [...new Set(rows.map((r) => `${r.scenario}\t${r.label}`))];
  for (const k of keys) {
    const [sc, label] = k.split('\t');
    const rs = rows.filter((r) => r.scenario === sc && r.label === label);
    const m = (f) => { const x = median(rs.map(f)); return x === null ? '-' : String(r1(x)); };
    const okRuns = rs.filter((r) => r.ok).length;
    console.log(`| ${sc} | ${label} | ${rs.length} | ${m((r) => r.req_per_s)} | ${m((r) => r.p50_ms)} | ${m((r) => r.p90_ms)} | ${m((r) => r.p99_ms)} | ${m((r) => r.failed)} | ${okRuns}/${rs.length} ok | ${m((r) => r.cpu && r.cpu.server_cores)} | ${m((r) => r.cpu && r.cpu.pg_cores)} |`);
  }
}

(async () => {
  const at = new Date().toISOString();
  const fn = { react: scenarioReact, edit: scenarioEdit, changes: scenarioChanges, search: scenarioSearch }[o.scenario];
  const res = await fn();
  const line = JSON.stringify({ scenario: o.scenario, label: o.label || null, ...res, run_id: RUN, at, load: require('node:os').loadavg().map(r2) });
  process.stdout.write(line + '\n');
  if (o.out) fs.appendFileSync(o.out, line + '\n');
  await pool.close();
  process.exit(res.ok ? 0 : 1);
})().catch((err) => {
  console.error(`conversations.js: ${err && err.stack ? err.stack : err}`);
  process.exit(1);
});
