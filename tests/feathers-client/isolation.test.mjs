// A socket.io client that stops reading must not slow the others down: it is cut off,
// and a healthy Feathers client beside it gets every event, in order.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { socketApp, close, sql } from './helpers.mjs';

const N = 20000;

test('a stalled socket.io client is cut off while a healthy one gets all 20 000 events', async () => {
  const stalled = io(process.env.QUILL_URL, { transports: ['websocket'], reconnection: false });
  await new Promise((resolve, reject) => {
    stalled.once('connect', resolve);
    stalled.once('connect_error', reject);
  });
  const disconnected = new Promise((resolve) => stalled.once('disconnect', resolve));
  // Stop reading the TCP socket under the WebSocket: the server's writes back up.
  const tcp = stalled.io.engine.transport.ws._socket;
  tcp.pause();

  const { app, socket } = socketApp(['websocket']);
  await new Promise((resolve) => socket.once('connect', resolve));
  let received = 0;
  let last = 0;
  let ordered = true;
  const all = new Promise((resolve) => {
    app.service('messages').on('created', (m) => {
      if (m.id <= last) ordered = false;
      last = m.id;
      received += 1;
      if (received === N) resolve();
    });
  });
  await sql("INSERT INTO messages (text) SELECT g || repeat('x', 4096) FROM generate_series(1, $1) g", [N]);
  await all;
  assert.equal(received, N);
  assert.ok(ordered, 'events arrive in commit order');

  // Reading again, the stalled client finds it was disconnected.
  tcp.resume();
  const reason = await disconnected;
  assert.ok(['io server disconnect', 'transport close', 'transport error'].includes(reason), reason);
  close(socket);
});
