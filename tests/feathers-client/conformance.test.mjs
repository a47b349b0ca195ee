// quill against the official FeathersJS v5 clients: CRUD, queries, pagination, errors,
// authentication, real-time events (also for plain SQL writes) and channels.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { socketApp, restApp, loggedIn, nextEvent, eventsDuring, sql, close } from './helpers.mjs';

const sockets = [];
function app(transports) {
  const made = socketApp(transports);
  sockets.push(made.socket);
  return made.app;
}
after(() => sockets.forEach(close));

const transports = {
  'socket.io (websocket)': () => app(['websocket']),
  'socket.io (polling, then upgrade)': () => app(),
  rest: () => restApp()
};

for (const [name, make] of Object.entries(transports)) {
  test(`${name}: CRUD on messages`, async () => {
    const client = make();
    const me = await loggedIn(client);
    const messages = client.service('messages');
    const created = await messages.create({ text: 'hello' });
    assert.equal(created.text, 'hello');
    assert.equal(created.user_id, me.id, 'stamped with the caller');
    assert.deepEqual(await messages.get(created.id), created);
    const updated = await messages.update(created.id, { text: 'replaced' });
    assert.equal(updated.text, 'replaced');
    const patched = await messages.patch(created.id, { text: 'patched' });
    assert.equal(patched.text, 'patched');
    const removed = await messages.remove(created.id);
    assert.equal(removed.id, created.id);
    await assert.rejects(messages.get(created.id), (e) => e.name === 'NotFound' && e.code === 404);
  });

  test(`${name}: every query operator, pagination and $select`, async () => {
    const client = make();
    const me = await loggedIn(client);
    const messages = client.service('messages');
    const tag = `q-${Math.random().toString(36).slice(2)}`;
    for (const n of [1, 2, 3, 4, 5]) {
      await messages.create({ text: `${tag}-${n}` });
    }
    const texts = async (query) =>
      (await messages.find({ query: { user_id: me.id, ...query } })).data.map((m) => m.text.split('-').pop());
    assert.deepEqual(await texts({ text: `${tag}-2` }), ['2']);
    assert.deepEqual(await texts({ text: { $in: [`${tag}-1`, `${tag}-3`] } }), ['1', '3']);
    assert.deepEqual(await texts({ text: { $nin: [`${tag}-1`, `${tag}-3`] } }), ['2', '4', '5']);
    assert.deepEqual(await texts({ text: { $gt: `${tag}-3` } }), ['4', '5']);
    assert.deepEqual(await texts({ text: { $gte: `${tag}-3` } }), ['3', '4', '5']);
    assert.deepEqual(await texts({ text: { $lt: `${tag}-2` } }), ['1']);
    assert.deepEqual(await texts({ text: { $lte: `${tag}-2` } }), ['1', '2']);
    assert.deepEqual(await texts({ text: { $ne: `${tag}-2` } }), ['1', '3', '4', '5']);
    assert.deepEqual(await texts({ $or: [{ text: `${tag}-1` }, { text: `${tag}-5` }] }), ['1', '5']);
    assert.deepEqual(await texts({ $sort: { text: -1 }, $limit: 2 }), ['5', '4']);
    assert.deepEqual(await texts({ $sort: { text: 1 }, $skip: 3 }), ['4', '5']);
    const page = await messages.find({ query: { user_id: me.id, $limit: 2 } });
    assert.equal(page.total, 5);
    assert.equal(page.limit, 2);
    assert.equal(page.skip, 0);
    assert.equal(page.data.length, 2);
    const counted = await messages.find({ query: { user_id: me.id, $limit: 0 } });
    assert.deepEqual([counted.total, counted.data.length], [5, 0]);
    const selected = await messages.find({ query: { user_id: me.id, $select: ['text'], $limit: 1 } });
    assert.deepEqual(Object.keys(selected.data[0]).sort(), ['id', 'text']);
  });

  test(`${name}: errors arrive as Feathers error classes`, async () => {
    const client = make();
    await assert.rejects(client.service('messages').find(), (e) => e.name === 'NotAuthenticated' && e.code === 401);
    await loggedIn(client);
    await assert.rejects(client.service('messages').get(987654321), (e) => e.name === 'NotFound' && e.className === 'not-found');
    await assert.rejects(client.service('messages').create({ nope: 1 }), (e) => e.name === 'BadRequest' && e.code === 400);
    await assert.rejects(client.service('nowhere').find(), (e) => e.name === 'NotFound');
    await assert.rejects(client.service('users').patch(1, { role: 'admin' }), (e) => ['Forbidden', 'NotFound'].includes(e.name));
    await assert.rejects(client.service('messages').create([{ text: 'a' }, { text: 'b' }]), (e) => e.name === 'MethodNotAllowed');
  });

  test(`${name}: local and jwt authentication, and no password anywhere`, async () => {
    const client = make();
    const user = await loggedIn(client);
    assert.equal(user.password, undefined);
    const again = await client.reAuthenticate(true);
    assert.equal(again.user.id, user.id);
    assert.equal(again.authentication.strategy, 'jwt');
    const users = await client.service('users').find({ query: { $select: ['password', 'email'] } });
    assert.ok(!JSON.stringify(users).includes('password'));
    assert.ok(!JSON.stringify(await client.get('authentication')).includes('secret-pw'));
    await assert.rejects(client.authenticate({ strategy: 'local', email: user.email, password: 'wrong' }), (e) => e.name === 'NotAuthenticated');
  });
}

test('socket.io: all four event kinds, for Feathers writes and plain SQL writes', async () => {
  const writer = app(['websocket']);
  const listener = app();
  const me = await loggedIn(writer);
  await loggedIn(listener);
  const messages = listener.service('messages');
  const mine = (m) => m.user_id === me.id;
  let pending = nextEvent(messages, 'created', mine);
  const m = await writer.service('messages').create({ text: 'one' });
  assert.equal((await pending).id, m.id);
  pending = nextEvent(messages, 'updated', mine);
  await writer.service('messages').update(m.id, { text: 'two' });
  assert.equal((await pending).text, 'two');
  pending = nextEvent(messages, 'patched', mine);
  await writer.service('messages').patch(m.id, { text: 'three' });
  assert.equal((await pending).text, 'three');
  pending = nextEvent(messages, 'removed', mine);
  await writer.service('messages').remove(m.id);
  assert.equal((await pending).id, m.id);

  // Writes that never went through quill.
  const fromSql = (m) => m.text === 'written in SQL';
  pending = nextEvent(messages, 'created', fromSql);
  const { rows } = await sql("INSERT INTO messages (text) VALUES ('written in SQL') RETURNING id");
  const sqlId = Number(rows[0].id); // pg returns int8 as a string
  assert.equal((await pending).id, sqlId);
  pending = nextEvent(messages, 'patched', (m) => m.id === sqlId);
  await sql('UPDATE messages SET text = $1 WHERE id = $2', ['edited in SQL', rows[0].id]);
  assert.equal((await pending).text, 'edited in SQL');
  pending = nextEvent(messages, 'removed', (m) => m.id === sqlId);
  await sql('DELETE FROM messages WHERE id = $1', [rows[0].id]);
  await pending;

  // users events carry no password
  pending = nextEvent(listener.service('users'), 'patched', (u) => u.id === me.id);
  await writer.service('users').patch(me.id, { password: 'new-secret' });
  assert.ok(!JSON.stringify(await pending).includes('password'));
});

test('socket.io: anonymous connections get no events, authenticated ones do', async () => {
  const anonymous = app(['websocket']);
  const member = app(['websocket']);
  await loggedIn(member);
  const writer = app(['websocket']);
  await loggedIn(writer);
  const seenByAnonymous = eventsDuring(anonymous.service('messages'), 'created', 800);
  const seenByMember = nextEvent(member.service('messages'), 'created', (m) => m.text === 'for members');
  await writer.service('messages').create({ text: 'for members' });
  await seenByMember;
  assert.deepEqual(await seenByAnonymous, []);
});

test('socket.io: the client re-authenticates after a reconnect and keeps receiving', async () => {
  const { app: client, socket } = socketApp(['websocket']);
  sockets.push(socket);
  const me = await loggedIn(client);
  socket.io.engine.close(); // drop the transport; socket.io-client reconnects by itself
  await new Promise((resolve) => socket.once('connect', resolve));
  const writer = app(['websocket']);
  await loggedIn(writer);
  const pending = nextEvent(client.service('messages'), 'created', (m) => m.text === 'after reconnect');
  await writer.service('messages').create({ text: 'after reconnect' });
  await pending;
  // Only the owner may patch a user: this proves the new connection is logged in as `me`.
  const mine = await client.service('users').patch(me.id, { email: `again-${me.email}` });
  assert.equal(mine.id, me.id, 'calls after the reconnect run as the same user');
  await client.logout();
  await assert.rejects(client.service('messages').find(), (e) => e.code === 401);
});

test('socket.io: too many arguments get BadRequest, as Feathers answers', async () => {
  const { socket } = socketApp(['websocket']);
  sockets.push(socket);
  const reply = await new Promise((resolve) => socket.emit('get', 'messages', 1, {}, 'extra', (...args) => resolve(args)));
  assert.equal(reply.length, 1);
  assert.equal(reply[0].name, 'BadRequest');
  assert.equal(reply[0].message, "Too many arguments for 'get' method");
});
