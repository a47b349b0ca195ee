// The official Supabase Realtime clients against quill: postgres_changes from plain SQL,
// filters, channels, tokens, broadcast, channels' visibility, and the order /ws sees.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { ANON_KEY, Inbox, URL, WS_URL, anonKey, jwt, live, loggedAt, realtime, sql, statuses, supabase, user } from './helpers.mjs';

const clients = [];
function track(client) {
  clients.push(client);
  return client;
}
after(async () => {
  for (const c of clients) {
    await (c.removeAllChannels?.() ?? c.realtime?.removeAllChannels());
    c.disconnect?.();
  }
  await sql.end();
});

/** A row of notes as the client gets it (no hidden column). */
async function noteRow(id) {
  const { rows } = await sql.query('SELECT row_to_json(n.*)::jsonb - $2 AS row FROM notes n WHERE id = $1', [id, 'secret']);
  return rows[0].row;
}

async function insertNote(fields) {
  const cols = Object.keys(fields);
  const { rows } = await sql.query(
    `INSERT INTO notes (${cols.join(', ')}) VALUES (${cols.map((_, i) => `$${i + 1}`).join(', ')}) RETURNING id`,
    Object.values(fields),
  );
  return rows[0].id;
}

test('INSERT, UPDATE and DELETE from plain SQL arrive with the payloads Supabase sends', async () => {
  const client = track(supabase());
  const all = new Inbox('*');
  const inserts = new Inbox('INSERT room=eq.lobby');
  const channel = client
    .channel('room-1')
    .on('postgres_changes', { event: '*', schema: 'public', table: 'notes' }, all.push)
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'notes', filter: 'room=eq.lobby' }, inserts.push);
  await live(channel);

  const id = await insertNote({ room: 'lobby', body: 'hi', n: 7, flag: false, meta: { k: 'v' }, tags: ['a', 'b'], secret: 's3cret' });
  const inserted = await noteRow(id);
  const insertedAt = await loggedAt('notes');
  await sql.query("UPDATE notes SET body = 'edited', n = 8 WHERE id = $1", [id]);
  const updated = await noteRow(id);
  const updatedAt = await loggedAt('notes');
  await sql.query('DELETE FROM notes WHERE id = $1', [id]);
  const deletedAt = await loggedAt('notes');

  const events = await all.until((e) => e.length >= 3, 'three changes');
  const base = { schema: 'public', table: 'notes', errors: null };
  assert.deepEqual(events[0], { ...base, commit_timestamp: insertedAt, eventType: 'INSERT', new: inserted, old: {} });
  assert.deepEqual(events[1], { ...base, commit_timestamp: updatedAt, eventType: 'UPDATE', new: updated, old: inserted });
  assert.deepEqual(events[2], { ...base, commit_timestamp: deletedAt, eventType: 'DELETE', new: {}, old: updated });
  // The client's own conversions leave quill's JSON values as they are.
  assert.equal(events[0].new.id, Number(id));
  assert.deepEqual(events[0].new.meta, { k: 'v' });
  assert.deepEqual(events[0].new.tags, ['a', 'b']);
  assert.ok(!('secret' in events[0].new) && !('secret' in events[2].old), 'the hidden column never leaves quill');
  // The INSERT binding with its filter fired once, for the insert.
  const filtered = await inserts.until((e) => e.length >= 1);
  assert.deepEqual(filtered, [events[0]]);
});

test('vsn 1.0.0 (JSON objects) delivers the same', async () => {
  const client = track(realtime(ANON_KEY, { vsn: '1.0.0' }));
  const updates = new Inbox('UPDATE n=gt.5');
  const channel = client
    .channel('room-2')
    .on('postgres_changes', { event: 'UPDATE', schema: 'public', table: 'notes', filter: 'n=gt.5' }, updates.push);
  await live(channel);
  const id = await insertNote({ room: 'v1', n: 6 });
  await sql.query('UPDATE notes SET n = 9 WHERE id = $1', [id]);
  const [event] = await updates.until((e) => e.length >= 1);
  assert.equal(event.eventType, 'UPDATE');
  assert.equal(event.new.n, 9);
  assert.equal(event.old.n, 6);
});

test('every filter operator matches as find does', async () => {
  const client = track(supabase());
  const tag = `ops-${Date.now()}`;
  const filters = {
    eq: 'n=eq.3',
    neq: 'n=neq.3',
    lt: 'n=lt.3',
    lte: 'n=lte.3',
    gt: 'n=gt.3',
    gte: 'n=gte.3',
    in: 'n=in.(1,5)',
  };
  const inboxes = {};
  let channel = client.channel(tag);
  for (const [op, filter] of Object.entries(filters)) {
    inboxes[op] = new Inbox(op);
    channel = channel.on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'notes', filter }, inboxes[op].push);
  }
  const sentinel = new Inbox('sentinel');
  channel = channel.on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'notes', filter: `room=eq.${tag}-end` }, sentinel.push);
  await live(channel);
  for (const n of [1, 2, 3, 4, 5]) await insertNote({ room: tag, n });
  await insertNote({ room: `${tag}-end`, n: 100 });
  await sentinel.until((e) => e.length === 1, 'the sentinel');
  const got = (op) => inboxes[op].items.filter((e) => e.new.room === tag).map((e) => e.new.n);
  assert.deepEqual(got('eq'), [3]);
  assert.deepEqual(got('neq'), [1, 2, 4, 5]);
  assert.deepEqual(got('lt'), [1, 2]);
  assert.deepEqual(got('lte'), [1, 2, 3]);
  assert.deepEqual(got('gt'), [4, 5]);
  assert.deepEqual(got('gte'), [3, 4, 5]);
  assert.deepEqual(got('in'), [1, 5]);
});

test('a bad filter and an unknown table get Supabase system errors', async () => {
  const client = track(supabase());
  const bad = client.channel('bad-filter').on('postgres_changes', { event: '*', schema: 'public', table: 'notes', filter: 'wrong' }, () => {});
  await assert.rejects(live(bad), /Error parsing `filter` params: \["wrong"\]/);
  const noColumn = client.channel('no-column').on('postgres_changes', { event: '*', schema: 'public', table: 'notes', filter: 'nope=eq.1' }, () => {});
  await assert.rejects(live(noColumn), /Unable to subscribe to changes with given parameters\. An exception happened.*nope/);
  const unknown = client.channel('unknown').on('postgres_changes', { event: '*', schema: 'public', table: 'doesnotexist' }, () => {});
  await assert.rejects(
    live(unknown),
    /Please check Realtime is enabled for the given connect parameters: \[event: \*, schema: public, table: doesnotexist, filters: \[\], select: nil\]/,
  );
});

test('several channels and bindings on one socket: one frame per channel, each binding once', async () => {
  const client = track(supabase());
  const tag = `multi-${Date.now()}`;
  const a = { all: new Inbox('a *'), ins: new Inbox('a INSERT') };
  const b = new Inbox('b DELETE');
  const channelA = client
    .channel(`${tag}-a`)
    .on('postgres_changes', { event: '*', schema: 'public', table: 'notes', filter: `room=eq.${tag}` }, a.all.push)
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'notes', filter: `room=eq.${tag}` }, a.ins.push);
  const channelB = client
    .channel(`${tag}-b`)
    .on('postgres_changes', { event: 'DELETE', schema: 'public', table: 'notes' }, b.push);
  await Promise.all([live(channelA), live(channelB)]);
  const id = await insertNote({ room: tag, n: 1 });
  await sql.query('DELETE FROM notes WHERE id = $1', [id]);
  await a.all.until((e) => e.length === 2);
  await b.until((e) => e.some((d) => d.old.id === Number(id)));
  assert.deepEqual(a.all.items.map((e) => e.eventType), ['INSERT', 'DELETE']);
  assert.deepEqual(a.ins.items.map((e) => e.eventType), ['INSERT']);
  assert.equal(b.items.filter((d) => d.old.id === Number(id)).length, 1);
});

test('after leaving, a channel gets nothing; joined again, it gets what follows', async () => {
  const client = track(supabase());
  const tag = `leave-${Date.now()}`;
  const witness = new Inbox('witness');
  await live(client.channel(`${tag}-witness`).on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'notes', filter: `room=eq.${tag}` }, witness.push));
  const first = new Inbox('first join');
  const channel = client.channel(tag).on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'notes', filter: `room=eq.${tag}` }, first.push);
  const states = statuses(channel);
  await states.until((s) => s.some((x) => x.status === 'SUBSCRIBED'));
  await insertNote({ room: tag, n: 1 });
  await first.until((e) => e.length === 1);
  assert.equal(await client.removeChannel(channel), 'ok');
  await states.until((s) => s.some((x) => x.status === 'CLOSED'));
  await insertNote({ room: tag, n: 2 });
  await witness.until((e) => e.length === 2, 'the witness to see the second row');
  const again = new Inbox('second join');
  await live(client.channel(tag).on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'notes', filter: `room=eq.${tag}` }, again.push));
  await insertNote({ room: tag, n: 3 });
  await witness.until((e) => e.length === 3);
  await again.until((e) => e.length === 1);
  assert.deepEqual(first.items.map((e) => e.new.n), [1]);
  assert.deepEqual(again.items.map((e) => e.new.n), [3]);
});

/** The HTTP answer to a WebSocket upgrade. */
function upgradeAnswer(url) {
  return new Promise((resolve) => {
    const socket = new WebSocket(url);
    socket.on('open', () => {
      socket.close();
      resolve({ status: 101 });
    });
    socket.on('unexpected-response', (_req, res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode, body: JSON.parse(body) }));
    });
    socket.on('error', () => {});
  });
}

test('a missing, malformed, forged or expired API key is refused at the upgrade, as Supabase does', async () => {
  const endpoint = `${WS_URL}/realtime/v1/websocket?vsn=2.0.0`;
  assert.deepEqual(await upgradeAnswer(endpoint), { status: 401, body: { error: 'API key is missing' } });
  assert.deepEqual(await upgradeAnswer(`${endpoint}&apikey=nonsense`), {
    status: 401,
    body: { error: 'The token provided is not a valid JWT' },
  });
  const forged = jwt({ role: 'anon', exp: Math.floor(Date.now() / 1000) + 60, iss: 'quill', aud: 'quill' }, 'not the secret');
  assert.deepEqual(await upgradeAnswer(`${endpoint}&apikey=${forged}`), {
    status: 401,
    body: { error: 'Failed to validate JWT signature' },
  });
  assert.deepEqual(await upgradeAnswer(`${endpoint}&apikey=${anonKey(-60)}`), { status: 401, body: { error: 'Token has expired' } });
  assert.equal((await upgradeAnswer(`${endpoint}&apikey=${ANON_KEY}`)).status, 101);
  assert.equal((await upgradeAnswer(`${WS_URL}/socket/websocket?apikey=${ANON_KEY}`)).status, 101);
  // The real client: its channel reports the failure.
  const client = track(realtime('nonsense'));
  const states = statuses(client.channel('refused'));
  await states.until((s) => s.some((x) => x.status === 'CHANNEL_ERROR'));
  client.disconnect();
});

test('tokens: an expired one is refused at join, a user token sees more, a bad refresh closes the channel', async () => {
  const me = await user();
  const client = track(realtime());
  const expired = jwt({ iss: 'quill', aud: 'quill', sub: String(me.id), exp: Math.floor(Date.now() / 1000) - 5, iat: 0, jti: 'x' });
  await client.setAuth(expired);
  const refused = statuses(client.channel('expired').on('postgres_changes', { event: '*', schema: 'public', table: 'messages' }, () => {}));
  const [error] = await refused.until((s) => s.some((x) => x.status === 'CHANNEL_ERROR'));
  assert.match(error.message, /^InvalidJWTToken: Token has expired/);
  await client.removeAllChannels();

  // Anonymous (the API key): messages are for logged-in users only.
  await client.setAuth(ANON_KEY);
  const messages = new Inbox('messages');
  const notes = new Inbox('notes');
  const channel = client
    .channel('upgrade')
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'messages' }, messages.push)
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'notes', filter: 'room=eq.upgrade' }, notes.push);
  const system = new Inbox('system');
  channel.on('system', {}, system.push);
  await live(channel);
  await sql.query("INSERT INTO messages (text) VALUES ('before login')");
  await insertNote({ room: 'upgrade', n: 1 });
  await notes.until((e) => e.length === 1, 'the sentinel note');
  assert.equal(messages.items.length, 0, 'an anonymous client gets no authenticated-only event');

  // The user's token: the same channel now gets messages.
  await client.setAuth(me.token);
  await system.until((s) => s.filter((m) => m.message === 'Subscribed to PostgreSQL').length >= 2, 'the resubscription');
  await sql.query("INSERT INTO messages (text) VALUES ('after login')");
  await messages.until((e) => e.length === 1);
  assert.equal(messages.items[0].new.text, 'after login');

  // A token that does not hold: system error, then CLOSED.
  await client.setAuth('not.a.jwt');
  await system.until((s) => s.some((m) => m.extension === 'system' && m.status === 'error'));
  await channel.states.until((s) => s.some((x) => x.status === 'CLOSED'));
  assert.equal(system.items.find((m) => m.status === 'error').message, 'The token provided is not a valid JWT');
});

test('a token that expires while joined closes the channel', async () => {
  const me = await user();
  const client = track(realtime());
  const soon = jwt({ iss: 'quill', aud: 'quill', sub: String(me.id), exp: Math.floor(Date.now() / 1000) + 2, iat: 0, jti: 'y' });
  await client.setAuth(soon);
  const system = new Inbox('system');
  const channel = client.channel('expiring').on('postgres_changes', { event: '*', schema: 'public', table: 'messages' }, () => {});
  channel.on('system', {}, system.push);
  const states = statuses(channel);
  await states.until((s) => s.some((x) => x.status === 'SUBSCRIBED'));
  await states.until((s) => s.some((x) => x.status === 'CLOSED'), 'the close at expiry', 10000);
  assert.match(system.items.find((m) => m.extension === 'system').message, /^Token has expired/);
});

test('broadcast reaches the other clients, the sender too with self, and is acknowledged with ack', async () => {
  const topic = `chat-${Date.now()}`;
  const alice = track(supabase());
  const bob = track(supabase());
  const v1 = track(realtime(ANON_KEY, { vsn: '1.0.0' }));
  const heardByAlice = new Inbox('alice');
  const heardByBob = new Inbox('bob');
  const heardByV1 = new Inbox('v1');
  const a = alice.channel(topic, { config: { broadcast: { self: true, ack: true } } }).on('broadcast', { event: 'cursor' }, heardByAlice.push);
  const b = bob.channel(topic).on('broadcast', { event: '*' }, heardByBob.push);
  const c = v1.channel(topic).on('broadcast', { event: 'cursor' }, heardByV1.push);
  await Promise.all([live(a, { pg: false }), live(b, { pg: false }), live(c, { pg: false })]);

  assert.equal(await a.send({ type: 'broadcast', event: 'cursor', payload: { x: 1 } }), 'ok');
  const expected = { type: 'broadcast', event: 'cursor', payload: { x: 1 } };
  assert.deepEqual((await heardByBob.until((e) => e.length === 1))[0], expected);
  assert.deepEqual((await heardByAlice.until((e) => e.length === 1))[0], expected);
  assert.deepEqual((await heardByV1.until((e) => e.length === 1))[0], expected);

  // Without self, Bob does not hear himself: Alice's next message comes after his.
  assert.equal(await b.send({ type: 'broadcast', event: 'cursor', payload: { x: 2 } }), 'ok');
  assert.equal(await c.send({ type: 'broadcast', event: 'cursor', payload: { x: 3 } }), 'ok');
  // (Messages of different senders have no order between them: wait for this one.)
  await heardByBob.until((e) => e.some((m) => m.payload.x === 3));
  await a.send({ type: 'broadcast', event: 'cursor', payload: { x: 4 } });
  await heardByBob.until((e) => e.some((m) => m.payload.x === 4));
  assert.deepEqual(heardByBob.items.map((m) => m.payload.x), [1, 3, 4]);
  await heardByAlice.until((e) => e.some((m) => m.payload.x === 4));
  assert.deepEqual(heardByAlice.items.map((m) => m.payload.x), [1, 2, 3, 4]);
});

test('a deleted row reaches only those who could see it', async () => {
  const owner = await user('owner');
  const other = await user('other');
  const forOwner = new Inbox('owner');
  const forOther = new Inbox('other');
  const ownerClient = track(realtime());
  await ownerClient.setAuth(owner.token);
  const otherClient = track(realtime());
  await otherClient.setAuth(other.token);
  await live(ownerClient.channel('diary').on('postgres_changes', { event: '*', schema: 'public', table: 'diary' }, forOwner.push));
  await live(otherClient.channel('diary').on('postgres_changes', { event: '*', schema: 'public', table: 'diary' }, forOther.push));
  const { rows } = await sql.query("INSERT INTO diary (owner_id, body) VALUES ($1, 'dear diary') RETURNING id", [owner.id]);
  await sql.query('DELETE FROM diary WHERE id = $1', [rows[0].id]);
  await sql.query("INSERT INTO diary (owner_id, body) VALUES ($1, 'sentinel')", [other.id]);
  await forOwner.until((e) => e.length === 2);
  await forOther.until((e) => e.length === 1, 'the sentinel');
  assert.deepEqual(forOwner.items.map((e) => [e.eventType, e.old.body ?? e.new.body]), [
    ['INSERT', 'dear diary'],
    ['DELETE', 'dear diary'],
  ]);
  assert.deepEqual(forOther.items.map((e) => e.new.body), ['sentinel']);
});

test('the same SQL writes arrive in the same order on a Supabase client and a /ws client', async () => {
  const tag = `order-${Date.now()}`;
  const client = track(supabase());
  const viaSupabase = new Inbox('supabase');
  await live(client.channel(tag).on('postgres_changes', { event: '*', schema: 'public', table: 'notes', filter: `room=eq.${tag}` }, viaSupabase.push));
  const viaWs = new Inbox('/ws');
  const ws = new WebSocket(`${WS_URL}/ws`);
  await new Promise((resolve, reject) => {
    ws.on('open', () => ws.send(JSON.stringify({ ref: 1, method: 'subscribe', service: 'notes', query: { room: tag } })));
    ws.on('message', (raw) => {
      const frame = JSON.parse(raw);
      if (frame.ref === 1) return frame.error ? reject(new Error(JSON.stringify(frame.error))) : resolve();
      if (frame.event) viaWs.push(frame);
    });
    ws.on('error', reject);
  });
  // Mixed transactions from two connections, committed in an order of their own.
  const a = await sql.connect();
  const b = await sql.connect();
  try {
    for (let round = 0; round < 20; round++) {
      await a.query('BEGIN');
      await b.query('BEGIN');
      const { rows } = await a.query('INSERT INTO notes (room, n) VALUES ($1, $2), ($1, $3) RETURNING id', [tag, round * 10, round * 10 + 1]);
      await b.query('INSERT INTO notes (room, n) VALUES ($1, $2)', [tag, round * 10 + 2]);
      await a.query('UPDATE notes SET n = n + 1000 WHERE id = $1', [rows[0].id]);
      if (round % 2) {
        await b.query('COMMIT');
        await a.query('COMMIT');
      } else {
        await a.query('COMMIT');
        await b.query('COMMIT');
      }
      if (round % 5 === 4) await sql.query('DELETE FROM notes WHERE id = $1', [rows[1].id]);
    }
  } finally {
    a.release();
    b.release();
  }
  const total = 20 * 4 + 4;
  await viaSupabase.until((e) => e.length === total, `${total} changes`);
  await viaWs.until((e) => e.length === total, `${total} changes`);
  const kind = { created: 'INSERT', patched: 'UPDATE', updated: 'UPDATE', removed: 'DELETE' };
  const fromWs = viaWs.items.map((f) => `${kind[f.event]} ${f.data.id} ${f.data.n}`);
  const fromSupabase = viaSupabase.items.map((e) => {
    const row = e.eventType === 'DELETE' ? e.old : e.new;
    return `${e.eventType} ${row.id} ${row.n}`;
  });
  assert.deepEqual(fromSupabase, fromWs);
  ws.close();
});
