// quill and a Feathers v5 server (server.mjs) side by side: the same tables, the same
// policy, the same socket.io clients speaking the Feathers protocol from this process.
//
//   node bench/feathers/compare.mjs [--quill target/release/quill]
//     [--database-url postgres://postgres@127.0.0.1:5432/postgres] [--seconds 10] [--rounds 2]
//     [--fanout 100,1000] [--idle 1000] [--rate 200] [--subscribers 10] [--only latency,fanout,idle]
//     [--write-delay-ms 0] [--quill-subscribers socketio|ws]
//
// Each scenario runs against quill and Feathers in turn (quill, feathers, quill, …), prints one
// JSON line per run and then a markdown table with the medians and their ratio.
import { execFileSync, spawn } from 'node:child_process';
import { EventEmitter, once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import readline from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { io } from 'socket.io-client';
import WebSocket from 'ws';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '../..');
const DATABASES = { quill: 'quill_peer_bench_quill', feathers: 'quill_peer_bench_feathers' };
const QUILL_SECRET = 'quill peer bench secret: only for throwaway servers';
const FEATHERS_SECRET = 'feathers peer bench secret: only for throwaway servers';
const EMAIL = 'bench@example.com';
const PASSWORD = 'bench-pw';
// The last message of a phase: once a connection has it, it has everything written before.
const SENTINEL = 'sentinel';
const CONNECT_BATCH = 100;
const START_TIMEOUT_MS = 60_000;
const CALL_TIMEOUT_MS = 10_000;
const DRAIN_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 10_000;
const CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());
const TIMED_OUT = Symbol('timed out');
const QUILL_CONFIG_FILE = path.join(os.tmpdir(), `quill-peer-bench-${process.pid}.toml`);

// quill's demo policy (src/demo.toml) with the limits of `quill bench`: one client address
// opens every connection, and idle ones must not be pinged away.
const QUILL_CONFIG = `
demo_tables = true
host = "127.0.0.1"
outgoing_queue = 8192
pool_size = 16

[limits]
max_connections = 1000000
connections_per_address = 1000000
ping_interval_ms = 1800000
idle_timeout_ms = 3600000
write_delay_ms = WRITE_DELAY_MS

[authentication]
service = "users"

[authentication.rate_limit]
per_address = 1000000
per_username = 1000000
signups_per_address = 1000000

[services.users]
hidden = ["password"]
publish = ["authenticated"]
access = { create = "public", find = "authenticated", get = "authenticated", update = "authenticated", patch = "authenticated", remove = "authenticated" }

[services.messages]
publish = ["authenticated"]
stamp = { user_id = "id" }
access = "authenticated"
`;

// Table columns per scenario. `better` says which way the ratio row is taken: quill ÷
// Feathers for "higher", Feathers ÷ quill ("× lower") for "lower"; no ratio without it.
const LATENCY_COLUMNS = [
  { key: 'writes_per_s', label: 'writes/s' },
  { key: 'p50_ms', label: 'p50 ms', better: 'lower' },
  { key: 'p99_ms', label: 'p99 ms', better: 'lower' },
  { key: 'p999_ms', label: 'p99.9 ms', better: 'lower' },
  { key: 'max_ms', label: 'max ms', better: 'lower' },
  { key: 'delivered_share', label: 'delivered', better: 'higher' },
  { key: 'client_cpu_pct', label: 'client CPU %' },
];
const FANOUT_COLUMNS = [
  { key: 'writes_per_s', label: 'writes/s', better: 'higher' },
  { key: 'delivered_per_s', label: 'events/s', better: 'higher' },
  { key: 'lost', label: 'lost' },
  { key: 'server_cpu_s', label: 'server CPU s' },
  { key: 'server_cpu_us_per_event', label: 'server CPU µs/event', better: 'lower' },
  { key: 'server_peak_rss_mib', label: 'server peak RSS MiB', better: 'lower' },
  { key: 'client_cpu_pct', label: 'client CPU %' },
];
const IDLE_COLUMNS = [
  { key: 'connections', label: 'connections' },
  { key: 'rss_before_mib', label: 'RSS before MiB' },
  { key: 'rss_after_mib', label: 'RSS after MiB' },
  { key: 'rss_delta_mib', label: 'RSS growth MiB', better: 'lower' },
  { key: 'kib_per_connection', label: 'KiB/connection', better: 'lower' },
];

const children = new Set();

function readOptions() {
  const { values } = parseArgs({
    options: {
      quill: { type: 'string', default: path.join(REPO, 'target/release/quill') },
      'database-url': { type: 'string', default: 'postgres://postgres@127.0.0.1:5432/postgres' },
      seconds: { type: 'string', default: '10' },
      rounds: { type: 'string', default: '2' },
      fanout: { type: 'string', default: '100,1000' },
      idle: { type: 'string', default: '1000' },
      rate: { type: 'string', default: '200' },
      subscribers: { type: 'string', default: '10' },
      // Fan-out writers, each awaiting its ack: with 4, the writers' acks (queued behind
      // 1 000 subscribers' events in this one process) bounded quill's rate, not quill.
      writers: { type: 'string', default: '16' },
      only: { type: 'string', default: 'latency,fanout,idle' },
      // quill's limits.write_delay_ms: 0 writes each event at once.
      'write-delay-ms': { type: 'string', default: '0' },
      // What quill's fan-out subscribers speak: socket.io, as Feathers' do, or quill's own
      // /ws (its delivery beside Feathers' socket.io one; the writers stay on socket.io).
      'quill-subscribers': { type: 'string', default: 'socketio' },
    },
  });
  const only = values.only.split(',');
  const unknown = only.filter((name) => !['latency', 'fanout', 'idle'].includes(name));
  if (unknown.length > 0) throw new Error(`--only: unknown scenario ${unknown.join(', ')}`);
  if (!['socketio', 'ws'].includes(values['quill-subscribers'])) {
    throw new Error(`--quill-subscribers: socketio or ws, not ${values['quill-subscribers']}`);
  }
  return {
    quill: path.resolve(values.quill),
    databaseUrl: values['database-url'],
    seconds: positive('--seconds', values.seconds),
    rounds: positive('--rounds', values.rounds),
    fanout: values.fanout.split(',').map((n) => positive('--fanout', n)),
    idle: positive('--idle', values.idle),
    rate: positive('--rate', values.rate),
    subscribers: positive('--subscribers', values.subscribers),
    writers: positive('--writers', values.writers),
    writeDelayMs: nonNegative('--write-delay-ms', values['write-delay-ms']),
    quillSubscribers: values['quill-subscribers'],
    only,
  };
}

function nonNegative(name, text) {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 0) throw new Error(`${name}: expected a whole number, got ${text}`);
  return value;
}

function positive(name, text) {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 1) throw new Error(`${name}: expected a positive integer, got ${text}`);
  return value;
}

// ---- waiting, always bounded ----

/** The promise's value, or `fallback` if it takes longer than `ms`. */
function within(promise, ms, fallback) {
  let timer;
  const late = new Promise((resolve) => {
    timer = setTimeout(resolve, ms, fallback);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** The promise's value; an error naming `what` if it takes longer than `ms`. */
async function withTimeout(promise, ms, what) {
  const value = await within(promise, ms, TIMED_OUT);
  if (value === TIMED_OUT) throw new Error(`no ${what} within ${ms / 1000} s`);
  return value;
}

// ---- the servers under test ----

/** A server under test: a child process on its own database, measured through its /proc.
 * Its output goes to our stderr, each line prefixed with its name, and is emitted as 'line'. */
class Server extends EventEmitter {
  constructor(name, command, args, env, url) {
    super();
    this.name = name;
    this.url = url;
    this.output = []; // its last lines, for error messages
    this.token = null;
    const child = spawn(command, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    children.add(child);
    child.on('exit', () => children.delete(child));
    for (const stream of [child.stdout, child.stderr]) {
      readline.createInterface({ input: stream }).on('line', (line) => {
        process.stderr.write(`[${name}] ${line}\n`);
        this.output = [...this.output.slice(-19), line];
        this.emit('line', line);
      });
    }
    this.running = true;
    // Rejects when the server ends (or cannot start): races every wait on it.
    this.exited = new Promise((_, reject) => {
      child.once('error', (error) => reject(error));
      child.once('exit', (code, signal) => reject(new Error(`exited (${signal ?? code})`)));
    }).catch((error) => {
      this.running = false;
      throw new Error(`${name}: ${error.message}${this.lastOutput()}`);
    });
    this.exited.catch(() => {}); // observed through checkAlive and the waits that race it
  }

  checkAlive() {
    if (!this.running) throw new Error(`${this.name} is no longer running${this.lastOutput()}`);
  }

  lastOutput() {
    return this.output.length === 0 ? '' : `; its last output:\n${this.output.join('\n')}`;
  }

  /** CPU seconds (user + system, every thread) the server has used so far. */
  cpuSeconds() {
    const stat = fs.readFileSync(`/proc/${this.child.pid}/stat`, 'utf8');
    // Fields 14 and 15 (utime, stime); the command name before them may hold spaces.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  }

  /** Resident memory now and its peak since the last resetPeak, in KiB. */
  memoryKib() {
    const status = fs.readFileSync(`/proc/${this.child.pid}/status`, 'utf8');
    const field = (name) => Number(status.match(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm'))[1]);
    return { rss: field('VmRSS'), peak: field('VmHWM') };
  }

  /** Starts a new peak-RSS window (writing 5 to clear_refs resets VmHWM to VmRSS). */
  resetPeak() {
    fs.writeFileSync(`/proc/${this.child.pid}/clear_refs`, '5');
  }

  /** Resolves when the server prints a line matching `pattern`. */
  printed(pattern) {
    return new Promise((resolve) => {
      const onLine = (line) => {
        if (pattern.test(line)) {
          this.off('line', onLine);
          resolve(line);
        }
      };
      this.on('line', onLine);
    });
  }

  async stop() {
    if (!this.running) return;
    this.child.kill('SIGTERM');
    if ((await within(this.exited.catch(() => {}), STOP_TIMEOUT_MS, TIMED_OUT)) === TIMED_OUT) {
      this.child.kill('SIGKILL');
    }
  }
}

async function freePort() {
  const probe = net.createServer().listen(0, '127.0.0.1');
  await once(probe, 'listening');
  const { port } = probe.address();
  probe.close();
  await once(probe, 'close');
  return port;
}

async function startQuill(options, databaseUrl) {
  const port = await freePort();
  fs.writeFileSync(QUILL_CONFIG_FILE, QUILL_CONFIG.replace('WRITE_DELAY_MS', String(options.writeDelayMs)));
  const env = { DATABASE_URL: databaseUrl, PORT: String(port), QUILL_JWT_SECRET: QUILL_SECRET, RUST_LOG: 'warn' };
  const server = new Server('quill', options.quill, ['serve', '--config', QUILL_CONFIG_FILE], env, `http://127.0.0.1:${port}`);
  await withTimeout(Promise.race([untilReady(server), server.exited]), START_TIMEOUT_MS, 'GET /ready = 200 from quill');
  return server;
}

/** Polls quill's readiness endpoint: its answer is the signal, there is no other. */
async function untilReady(server) {
  for (;;) {
    const status = await fetch(`${server.url}/ready`, { signal: AbortSignal.timeout(2000) }).then(
      (response) => response.status,
      () => 0, // not listening yet
    );
    if (status === 200) return;
    server.checkAlive();
    await sleep(100);
  }
}

async function startFeathers(databaseUrl) {
  const port = await freePort();
  const env = { DATABASE_URL: databaseUrl, PORT: String(port), FEATHERS_SECRET };
  // The node process itself, no npm wrapper: its pid is the server's.
  const server = new Server('feathers', process.execPath, [path.join(HERE, 'server.mjs')], env, `http://127.0.0.1:${port}`);
  const listening = server.printed(new RegExp(`^listening ${port}$`));
  await withTimeout(Promise.race([listening, server.exited]), START_TIMEOUT_MS, '"listening" from the Feathers server');
  return server;
}

// ---- the databases ----

function databaseUrl(adminUrl, name) {
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  return url.toString();
}

async function recreateDatabase(admin, name) {
  await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
  await admin.query(`CREATE DATABASE ${name}`);
}

// ---- socket.io clients, speaking the Feathers protocol as @feathersjs/socketio-client does ----

async function connect(url) {
  const socket = io(url, { transports: ['websocket'], forceNew: true, reconnection: false });
  const connected = new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('connect_error', reject);
  });
  try {
    await withTimeout(connected, CALL_TIMEOUT_MS, `socket.io connection to ${url}`);
    return socket;
  } catch (error) {
    socket.disconnect();
    throw error;
  }
}

/** A service call: `emit(method, path, ...args)`, acked with `[error]` or `[null, result]`. */
function call(socket, method, servicePath, ...args) {
  return new Promise((resolve, reject) => {
    // With a timeout, socket.io puts its own error (or null) before the server's ack arguments.
    socket.timeout(CALL_TIMEOUT_MS).emit(method, servicePath, ...args, (timedOut, error, result) => {
      if (timedOut) reject(new Error(`${method} ${servicePath}: no ack within ${CALL_TIMEOUT_MS / 1000} s`));
      else if (error) reject(new Error(`${method} ${servicePath}: ${error.name}: ${error.message}`));
      else resolve(result);
    });
  });
}

/** Signs the bench user up through the server's own users service and logs in. */
async function signUp(server) {
  const socket = await connect(server.url);
  try {
    await call(socket, 'create', 'users', { email: EMAIL, password: PASSWORD }, {});
  } finally {
    socket.disconnect();
  }
  return logIn(server);
}

/** Logs the bench user in with the local strategy, as @feathersjs/authentication-client
 * does, and returns the access token. */
async function logIn(server) {
  const socket = await connect(server.url);
  try {
    const login = { strategy: 'local', email: EMAIL, password: PASSWORD };
    const { accessToken } = await call(socket, 'create', 'authentication', login, {});
    return accessToken;
  } finally {
    socket.disconnect();
  }
}

/** A connection logged in with the jwt strategy (a password check each would only measure
 * the password hash). */
async function loggedIn(server) {
  const socket = await connect(server.url);
  try {
    await call(socket, 'create', 'authentication', { strategy: 'jwt', accessToken: server.token }, {});
    return socket;
  } catch (error) {
    socket.disconnect();
    throw error;
  }
}

/** Opens `n` logged-in connections, a batch at a time: thousands of handshakes at once would
 * only measure the accept queue. */
async function openClients(server, n, open = loggedIn) {
  const sockets = [];
  for (let first = 0; first < n; first += CONNECT_BATCH) {
    const batch = Array.from({ length: Math.min(CONNECT_BATCH, n - first) }, () => open(server));
    const settled = await Promise.allSettled(batch);
    sockets.push(...settled.filter((s) => s.status === 'fulfilled').map((s) => s.value));
    const failed = settled.find((s) => s.status === 'rejected');
    if (failed) {
      closeClients(sockets);
      throw failed.reason;
    }
  }
  return sockets;
}

function closeClients(sockets) {
  for (const socket of sockets) socket.disconnect();
}

/** A fan-out subscriber that speaks Engine.IO 4 and socket.io 5 over a WebSocket itself, as
 * socket.io-client does with `transports: ['websocket']`, and counts events without decoding
 * them: with 1 000 subscribers, socket.io-client's per-event decoding made the load generator,
 * not the server, the limit. It logs in with the jwt strategy like the others. */
function leanSubscriber(server) {
  const ws = new WebSocket(`${server.url.replace(/^http/, 'ws')}/socket.io/?EIO=4&transport=websocket`);
  const loggedIn = new Promise((resolve, reject) => {
    ws.once('error', reject);
    ws.once('close', () => reject(new Error('closed during the socket.io handshake')));
    const handshake = (data) => {
      const text = data.toString();
      if (text.startsWith('0{')) ws.send('40');
      else if (text.startsWith('40')) {
        ws.send(`420${JSON.stringify(['create', 'authentication', { strategy: 'jwt', accessToken: server.token }, {}])}`);
      } else if (text.startsWith('430[null,')) {
        ws.off('message', handshake);
        resolve();
      } else if (text.startsWith('430')) reject(new Error(`socket.io login failed: ${text}`));
    };
    ws.on('message', handshake);
  });
  const answerPing = (data) => data.length === 1 && data[0] === PING && ws.send('3');
  return leanOnceReady(ws, loggedIn, 'lean socket.io login', (onEvent) => countEvents(ws, EVENT_PREFIX, onEvent, answerPing));
}

/** A fan-out subscriber on quill's own `/ws` protocol (`--quill-subscribers ws`): it logs in
 * with the same token, subscribes to `messages` and counts their `created` events as the
 * socket.io one does. */
function leanWsSubscriber(server) {
  const ws = new WebSocket(`${server.url.replace(/^http/, 'ws')}/ws`);
  const subscribed = new Promise((resolve, reject) => {
    ws.once('error', reject);
    ws.once('close', () => reject(new Error('closed before subscribing')));
    const login = { strategy: 'jwt', accessToken: server.token };
    ws.once('open', () => ws.send(JSON.stringify({ ref: 1, method: 'create', service: 'authentication', data: login })));
    const handshake = (data) => {
      const reply = JSON.parse(data.toString());
      if (reply.error) reject(new Error(`/ws call ${reply.ref} failed: ${JSON.stringify(reply.error)}`));
      else if (reply.ref === 1) ws.send(JSON.stringify({ ref: 2, method: 'subscribe', service: 'messages' }));
      else if (reply.ref === 2) {
        ws.off('message', handshake);
        resolve();
      }
    };
    ws.on('message', handshake);
  });
  return leanOnceReady(ws, subscribed, '/ws login and subscribe', (onEvent) => countEvents(ws, WS_EVENT_PREFIX, onEvent));
}

/** A lean subscriber on `ws` once `ready` (its login) resolves within CALL_TIMEOUT_MS; the
 * socket is closed if it does not. */
function leanOnceReady(ws, ready, what, receive) {
  return withTimeout(ready, CALL_TIMEOUT_MS, what).then(
    () => ({ ws, receive, disconnect: () => ws.terminate() }),
    (error) => {
      ws.terminate();
      throw error;
    },
  );
}

/** Counts the messages that start with `prefix` (`messages created` events) into `onEvent`,
 * without decoding them, until the sentinel arrives or the connection closes; resolves with
 * 'sentinel' or 'cut off'. `other` sees every other message. */
function countEvents(ws, prefix, onEvent, other = () => {}) {
  return new Promise((resolve) => {
    ws.on('message', (data) => {
      if (!data.subarray(0, prefix.length).equals(prefix)) other(data);
      else if (data.includes(SENTINEL_FIELD)) resolve('sentinel');
      else onEvent();
    });
    ws.once('close', () => resolve('cut off'));
  });
}

const PING = '2'.charCodeAt(0);
const EVENT_PREFIX = Buffer.from('42["messages created",');
const WS_EVENT_PREFIX = Buffer.from('{"event":"created","service":"messages",');
const SENTINEL_FIELD = Buffer.from(`"text":"${SENTINEL}"`);

/** Passes a connection's `messages created` rows to `onRow` until the sentinel arrives or the
 * server cuts the connection off; resolves with 'sentinel' or 'cut off'. */
function receive(socket, onRow) {
  return new Promise((resolve) => {
    socket.on('messages created', (row) => (row.text === SENTINEL ? resolve('sentinel') : onRow(row)));
    socket.once('disconnect', () => resolve('cut off'));
  });
}

/** Writes the sentinel and waits, at most DRAIN_TIMEOUT_MS, for every receiver to get it. */
async function drain(writer, receiving) {
  await call(writer, 'create', 'messages', { text: SENTINEL }, {});
  const outcomes = await within(Promise.all(receiving), DRAIN_TIMEOUT_MS, TIMED_OUT);
  return {
    drained: outcomes !== TIMED_OUT,
    cut_off: outcomes === TIMED_OUT ? null : outcomes.filter((o) => o === 'cut off').length,
  };
}

// ---- measuring ----

/** CPU steal and total jiffies of the machine, from /proc/stat. */
function cpuCounters() {
  const [, ...jiffies] = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).map(Number);
  // user nice system idle iowait irq softirq steal (guest time is already in user)
  return { steal: jiffies[7], total: jiffies.slice(0, 8).reduce((a, b) => a + b, 0) };
}

/** Starts measuring a phase; the returned function ends it and returns what it cost. */
function startPhase(server) {
  server.resetPeak();
  const start = { time: performance.now(), server: server.cpuSeconds(), client: process.cpuUsage(), cpu: cpuCounters() };
  return () => {
    const seconds = (performance.now() - start.time) / 1000;
    const client = process.cpuUsage(start.client);
    const cpu = cpuCounters();
    return {
      seconds,
      serverCpu: server.cpuSeconds() - start.server,
      serverPeakKib: server.memoryKib().peak,
      clientCpuPct: (client.user + client.system) / 1e4 / seconds,
      stealPct: (100 * (cpu.steal - start.cpu.steal)) / Math.max(1, cpu.total - start.cpu.total),
    };
  };
}

/** Nearest-rank percentile of sorted values. */
function percentile(sorted, q) {
  return sorted.length === 0 ? null : sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
}

function round(value, digits) {
  return value === null ? null : Number(value.toFixed(digits));
}

/** Calls `send` `rate` times a second for `seconds`; a late tick delays the next rather than
 * bursting to catch up. */
async function atRate(rate, seconds, send) {
  const period = 1000 / rate;
  const end = performance.now() + seconds * 1000;
  let next = performance.now();
  while (next < end) {
    send();
    next += period;
    const wait = next - performance.now();
    if (wait > 0) await sleep(wait);
    else next = performance.now();
  }
}

// ---- the scenarios: each opens its own connections, measures one phase and closes them ----

/** `--subscribers` subscribers, one writer creating at `--rate`: time from the writer's emit
 * to each subscriber's receipt. */
async function latency(server, options) {
  const clients = await openClients(server, options.subscribers + 1);
  const [writer, ...subscribers] = clients;
  try {
    const sentAt = [];
    const latencies = [];
    const receiving = subscribers.map((s) => receive(s, (row) => latencies.push(performance.now() - sentAt[Number(row.text)])));
    const endPhase = startPhase(server);
    const acks = [];
    await atRate(options.rate, options.seconds, () => {
      const text = String(sentAt.length);
      sentAt.push(performance.now());
      // Settled into values: a rejection must not go unhandled before all are awaited.
      acks.push(call(writer, 'create', 'messages', { text }, {}).then(() => null, (error) => error));
    });
    const writeSeconds = (performance.now() - sentAt[0]) / 1000;
    const failed = (await Promise.all(acks)).find(Boolean);
    if (failed) throw failed;
    const delivery = await drain(writer, receiving);
    const phase = endPhase();
    latencies.sort((a, b) => a - b);
    return {
      subscribers: options.subscribers,
      writes: sentAt.length,
      writes_per_s: round(sentAt.length / writeSeconds, 1),
      p50_ms: round(percentile(latencies, 0.5), 2),
      p99_ms: round(percentile(latencies, 0.99), 2),
      p999_ms: round(percentile(latencies, 0.999), 2),
      max_ms: round(latencies.at(-1) ?? null, 2),
      delivered_share: round(latencies.length / (sentAt.length * options.subscribers), 4),
      ...delivery,
      client_cpu_pct: round(phase.clientCpuPct, 1),
      cpu_steal_pct: round(phase.stealPct, 1),
    };
  } finally {
    closeClients(clients);
  }
}

/** `n` subscribers, `--writers` writers creating flat out, each awaiting its ack before the next.
 * The writers are logged in, so they receive every event too: the server's CPU per event
 * counts their deliveries as well. */
async function fanout(server, options, n) {
  const writers = await openClients(server, options.writers);
  const lean = server.name === 'quill' && options.quillSubscribers === 'ws' ? leanWsSubscriber : leanSubscriber;
  const subscribers = await openClients(server, n, lean).catch((error) => {
    closeClients(writers);
    throw error;
  });
  const clients = [...writers, ...subscribers];
  try {
    let received = 0;
    let receivedByWriters = 0;
    const receiving = [
      ...subscribers.map((s) => s.receive(() => (received += 1))),
      ...writers.map((w) => receive(w, () => (receivedByWriters += 1))),
    ];
    const endPhase = startPhase(server);
    const start = performance.now();
    const end = start + options.seconds * 1000;
    let writes = 0;
    await Promise.all(
      writers.map(async (writer) => {
        while (performance.now() < end) {
          await call(writer, 'create', 'messages', { text: 'hello from the fan-out bench' }, {});
          writes += 1;
        }
      }),
    );
    const writeSeconds = (performance.now() - start) / 1000;
    const delivery = await drain(writers[0], receiving);
    const phase = endPhase();
    return {
      subscribers: n,
      writes,
      writes_per_s: round(writes / writeSeconds, 1),
      delivered_per_s: round(received / phase.seconds, 0),
      lost: writes * n - received,
      ...delivery,
      seconds: round(phase.seconds, 2),
      server_cpu_s: round(phase.serverCpu, 2),
      server_cpu_us_per_event: round((phase.serverCpu * 1e6) / Math.max(1, received + receivedByWriters), 2),
      server_peak_rss_mib: round(phase.serverPeakKib / 1024, 1),
      client_cpu_pct: round(phase.clientCpuPct, 1),
      cpu_steal_pct: round(phase.stealPct, 1),
    };
  } finally {
    closeClients(clients);
  }
}

/** `--idle` logged-in connections that do nothing: what holding them costs in memory. */
async function idle(server, options) {
  const before = server.memoryKib().rss;
  const clients = await openClients(server, options.idle);
  try {
    const after = server.memoryKib().rss;
    return {
      connections: options.idle,
      rss_before_mib: round(before / 1024, 1),
      rss_after_mib: round(after / 1024, 1),
      rss_delta_mib: round((after - before) / 1024, 1),
      kib_per_connection: round((after - before) / options.idle, 2),
    };
  } finally {
    closeClients(clients);
  }
}

function plan(options) {
  const scenarios = [];
  if (options.only.includes('latency')) {
    scenarios.push({ name: 'latency', columns: LATENCY_COLUMNS, run: (server) => latency(server, options) });
  }
  if (options.only.includes('fanout')) {
    for (const n of options.fanout) {
      scenarios.push({ name: `fanout/${n}`, columns: FANOUT_COLUMNS, run: (server) => fanout(server, options, n) });
    }
  }
  if (options.only.includes('idle')) {
    scenarios.push({ name: 'idle', columns: IDLE_COLUMNS, fresh: true, run: (server) => idle(server, options) });
  }
  return scenarios;
}

// ---- reporting ----

function median(values) {
  const sorted = values.filter((v) => v !== null).sort((a, b) => a - b);
  if (sorted.length === 0) return null;
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

function format(value) {
  if (value === null || !Number.isFinite(value)) return '–';
  if (Number.isInteger(value) || Math.abs(value) >= 100) return String(Math.round(value));
  return value.toFixed(Math.abs(value) >= 10 ? 1 : 2);
}

function ratio(column, quill, feathers) {
  const [numerator, denominator] = column.better === 'higher' ? [quill, feathers] : [feathers, quill];
  if (numerator === null || !denominator) return '–';
  return `${format(numerator / denominator)}×${column.better === 'lower' ? ' lower' : ''}`;
}

/** The scenario's rows in run order, the medians of each server and their ratio. */
function table(scenario, rows) {
  const medians = Object.fromEntries(
    ['quill', 'feathers'].map((name) => [
      name,
      Object.fromEntries(scenario.columns.map((c) => [c.key, median(rows.filter((r) => r.server === name).map((r) => r[c.key]))])),
    ]),
  );
  const line = (cells) => `| ${cells.join(' | ')} |`;
  return [
    `### ${scenario.name}`,
    '',
    line(['server', 'round', ...scenario.columns.map((c) => c.label)]),
    line(['---', '---', ...scenario.columns.map(() => '---')]),
    ...rows.map((r) => line([r.server, r.round, ...scenario.columns.map((c) => format(r[c.key]))])),
    ...['quill', 'feathers'].map((name) => line([name, 'median', ...scenario.columns.map((c) => format(medians[name][c.key]))])),
    line([
      'quill vs Feathers',
      'ratio',
      ...scenario.columns.map((c) => (c.better ? ratio(c, medians.quill[c.key], medians.feathers[c.key]) : '')),
    ]),
    '',
  ].join('\n');
}

function progress(message) {
  process.stderr.write(`[compare] ${message}\n`);
}

// ---- the run ----

async function main() {
  const options = readOptions();
  const admin = new pg.Client({ connectionString: options.databaseUrl });
  await withTimeout(admin.connect(), CALL_TIMEOUT_MS, 'connection to PostgreSQL');
  const servers = [];
  let cleanedUp;
  const cleanUp = () => {
    cleanedUp ??= (async () => {
      await Promise.all(servers.map((server) => server.stop()));
      for (const name of Object.values(DATABASES)) {
        await withTimeout(admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`), CALL_TIMEOUT_MS, `drop of ${name}`);
      }
      await admin.end();
    })();
    return cleanedUp;
  };
  process.once('SIGINT', () => {
    progress('interrupted: stopping the servers');
    within(cleanUp(), STOP_TIMEOUT_MS + CALL_TIMEOUT_MS, null).finally(() => process.exit(130));
  });
  try {
    for (const name of Object.values(DATABASES)) await recreateDatabase(admin, name);
    progress(`starting quill (${options.quill}) and the Feathers server`);
    const start = {
      quill: () => startQuill(options, databaseUrl(options.databaseUrl, DATABASES.quill)),
      feathers: () => startFeathers(databaseUrl(options.databaseUrl, DATABASES.feathers)),
    };
    for (const name of Object.keys(start)) servers.push(await start[name]());
    for (const server of servers) server.token = await signUp(server);

    const feathersVersion = JSON.parse(fs.readFileSync(path.join(HERE, 'node_modules/@feathersjs/feathers/package.json'), 'utf8')).version;
    console.log(`## quill vs Feathers ${feathersVersion}: ${os.cpus().length} cores, Node ${process.version}, ${options.seconds} s phases, quill write_delay_ms = ${options.writeDelayMs}, quill's fan-out subscribers on ${options.quillSubscribers === 'ws' ? '/ws' : 'socket.io'}\n`);
    for (const scenario of plan(options)) {
      const rows = [];
      for (let round = 1; round <= options.rounds; round += 1) {
        for (let i = 0; i < servers.length; i += 1) {
          if (scenario.fresh) {
            // A server that ran other phases keeps their memory for reuse: restart it.
            await servers[i].stop();
            servers[i] = await start[servers[i].name]();
            servers[i].token = await logIn(servers[i]);
          }
          const server = servers[i];
          server.checkAlive();
          progress(`${scenario.name}: ${server.name}, round ${round}`);
          const row = { scenario: scenario.name, server: server.name, round, ...(await scenario.run(server)) };
          console.log(JSON.stringify(row));
          rows.push(row);
        }
      }
      console.log(`\n${table(scenario, rows)}`);
    }
  } finally {
    await within(cleanUp(), STOP_TIMEOUT_MS + CALL_TIMEOUT_MS, null).catch((error) => progress(`cleaning up: ${error.message}`));
  }
}

// Whatever happens, no server or file of ours outlives the bench.
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
  fs.rmSync(QUILL_CONFIG_FILE, { force: true });
});

main().then(
  () => process.exit(0),
  (error) => {
    console.error(error);
    process.exit(1);
  },
);
