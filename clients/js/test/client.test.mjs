// The client against a real quill (started by the Rust test `js_client`): calls, replicas
// that match the database after SQL writes, scope moves, reconnects and resets.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import pg from 'pg';
import { connect, QuillError } from '../dist/index.js';

const URL = process.env.QUILL_URL;
const DATABASE_URL = process.env.DATABASE_URL;
if (!URL || !DATABASE_URL) throw new Error('QUILL_URL and DATABASE_URL must be set (the Rust test sets them)');

const db = new pg.Pool({ connectionString: DATABASE_URL, max: 2 });
// Closed even when a test fails, so that a failure ends the run instead of hanging it.
const clients = [];
after(() => {
  clients.forEach((c) => c.close());
  return db.end();
});
const open = (options) => {
  const client = connect(URL, options);
  clients.push(client);
  return client;
};
const sql = (text, values) => db.query(text, values);

// Where a held-back reconnect goes: a server that hangs up at once, so the attempt fails
// promptly (a closed port may leave a connect pending).
const refuser = net.createServer((socket) => socket.destroy());
await new Promise((resolve) => refuser.listen(0, '127.0.0.1', resolve));
const REFUSED = `ws://127.0.0.1:${refuser.address().port}/ws`;
after(() => refuser.close());

/** A WebSocket whose connections the test can cut, and whose reconnects it can hold back. */
function gatedSocket() {
  const gate = { open: true, sockets: [] };
  gate.frames = [];
  gate.WebSocket = class extends WebSocket {
    constructor(url) {
      // Held back: the attempt fails and the client backs off.
      super(gate.open ? url : REFUSED);
      gate.sockets.push(this);
      this.addEventListener('message', (m) => {
        gate.frames.push(String(m.data).slice(0, 120));
        // Runs before the client's handler: what the app saw after the previous frame.
        gate.onFrame?.();
      });
      this.addEventListener('close', (e) => gate.frames.push(`close ${e.code}`));
    }
  };
  gate.cut = () => gate.sockets.forEach((s) => s.close());
  return gate;
}

/** The rows of messages with user_id = user, by id as text. */
async function rowsOf(user) {
  const { rows } = await sql('SELECT row_to_json(m) AS r FROM messages m WHERE user_id = $1', [user]);
  return Object.fromEntries(rows.map(({ r }) => [String(r.id), r]));
}

const byId = (replica) => Object.fromEntries(replica.rows.map((r) => [String(r.id), r]));

/** Resolves when `check` holds after a change of the replica (fails, saying what the
 * replica holds, after 10 s). */
function until(replica, check, info = () => '') {
  return new Promise((resolve, reject) => {
    if (replica.synced && check()) return resolve();
    const timer = setTimeout(() => {
      stop();
      reject(new Error(`replica: synced ${replica.synced}, ${replica.size} rows: ${JSON.stringify(replica.rows.map((r) => r.text))} ${info()}`));
    }, 10000);
    const stop = replica.onChange(() => {
      if (check()) {
        clearTimeout(timer);
        stop();
        resolve();
      }
    });
  });
}

let users = 0;
async function newUser() {
  users += 1;
  const { rows } = await sql("INSERT INTO users (email) VALUES ($1) RETURNING id", [`js-${process.pid}-${users}@x`]);
  return rows[0].id;
}

test('the six methods, and errors as QuillError', { timeout: 20000 }, async () => {
  const client = open();
  const messages = client.service('messages');
  const { result: created, txid } = await messages.create({ text: 'hello' });
  assert.equal(created.text, 'hello');
  assert.match(txid, /^\d+$/);
  assert.equal((await messages.get(created.id)).text, 'hello');
  assert.equal((await messages.patch(created.id, { text: 'hi' })).result.text, 'hi');
  assert.equal((await messages.update(created.id, { text: 'whole' })).result.text, 'whole');
  const found = await messages.find({ id: created.id });
  assert.equal((Array.isArray(found) ? found : found.data).length, 1);
  await messages.remove(created.id);
  await assert.rejects(messages.get(created.id), (e) => e instanceof QuillError && e.code === 404 && e.name === 'NotFound');
  client.close();
});

test('a replica equals the database after SQL writes, moves in and out, and its own writes', { timeout: 20000 }, async () => {
  const [five, six] = [await newUser(), await newUser()];
  await sql("INSERT INTO messages (text, user_id) VALUES ('a', $1), ('b', $2)", [five, six]);
  const client = open();
  const replica = client.replica('messages', { query: { user_id: five } });
  const changes = [];
  replica.onChange((c) => changes.push(c));
  await replica.ready;
  assert.deepEqual(byId(replica), await rowsOf(five));
  assert.equal(changes[0].reset, true, 'the first snapshot is a reset of the empty copy');

  await sql("INSERT INTO messages (text, user_id) VALUES ('c', $1)", [five]);
  await sql("UPDATE messages SET user_id = $1 WHERE text = 'b' AND user_id = $2", [five, six]); // moves in
  await sql("UPDATE messages SET user_id = $1 WHERE text = 'a' AND user_id = $2", [six, five]); // moves out
  await until(replica, () => replica.rows.some((r) => r.text === 'b') && !replica.rows.some((r) => r.text === 'a'));
  assert.deepEqual(byId(replica), await rowsOf(five));

  // Its own write, in scope and out of it: resolved once the copy reflects it.
  const mine = await replica.create({ text: 'mine', user_id: five });
  assert.equal(replica.get(mine.id)?.text, 'mine');
  const { txid } = await client.service('messages').create({ text: 'elsewhere', user_id: six });
  await replica.waitFor(txid);
  assert.deepEqual(byId(replica), await rowsOf(five));
  await replica.remove(mine.id);
  assert.equal(replica.get(mine.id), undefined);
  client.close();
});

test('a replica resumes after a lost connection and gets what it missed', { timeout: 20000 }, async () => {
  const five = await newUser();
  const gate = gatedSocket();
  const client = open({ WebSocket: gate.WebSocket, backoff: { min: 20, max: 200 }, connectTimeout: 500 });
  const replica = client.replica('messages', { query: { user_id: five } });
  await replica.ready;
  const states = [];
  client.onState((s) => states.push(s));
  gate.open = false;
  gate.cut();
  await sql("INSERT INTO messages (text, user_id) VALUES ('while away', $1)", [five]);
  await sql("UPDATE messages SET text = 'edited while away' WHERE user_id = $1", [five]);
  gate.open = true;
  await until(replica, () => replica.rows.some((r) => r.text === 'edited while away'), () => `states ${states.join()}; sockets ${gate.sockets.map((s) => `${s.url}:${s.readyState}`).join(' ')}; frames ${gate.frames.join(' | ')}`);
  assert.deepEqual(byId(replica), await rowsOf(five));
  assert.ok(states.includes('closed') && states.at(-1) === 'open', states.join());
  client.close();
});

test('a replica too far behind is replaced by a fresh snapshot without an empty moment', { timeout: 20000 }, async () => {
  const five = await newUser();
  await sql("INSERT INTO messages (text, user_id) VALUES ('kept', $1)", [five]);
  const gate = gatedSocket();
  const client = open({ WebSocket: gate.WebSocket, backoff: { min: 20, max: 200 }, connectTimeout: 500 });
  const replica = client.replica('messages', { query: { user_id: five } });
  await replica.ready;
  const sizes = [];
  const resets = [];
  replica.onChange((c) => resets.push(c.reset));
  // The copy as the app sees it between any two frames: never emptied by the reset.
  gate.onFrame = () => sizes.push(replica.size);
  gate.open = false;
  gate.cut();
  // More changes than quill replays (the test runs it with max_replay_changes = 50).
  await sql("INSERT INTO messages (text, user_id) SELECT 'bulk ' || g, $1 FROM generate_series(1, 80) g", [five]);
  gate.open = true;
  await until(replica, () => replica.size === 81, () => `sockets ${gate.sockets.map((s) => `${s.url}:${s.readyState}`).join(' ')}; frames ${gate.frames.join(' | ')}`);
  assert.deepEqual(byId(replica), await rowsOf(five));
  assert.ok(resets.includes(true), 'a reset snapshot');
  // At least: the reply, the snapshot page, synced; a copy cleared at the reset shows 0.
  assert.ok(sizes.length >= 3 && !sizes.includes(0), `never empty: ${sizes}`);
  client.close();
});

test('a refused replica rejects ready', { timeout: 20000 }, async () => {
  const client = open();
  const replica = client.replica('messages', { query: { no_such_column: 1 } });
  await assert.rejects(replica.ready, (e) => e instanceof QuillError && e.code === 400);
  client.close();
});
