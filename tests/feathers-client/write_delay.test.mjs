// With limits.write_delay_ms, a change waits that long before it is written to a socket.io
// client, and changes that come meanwhile go out with it, in order.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { socketApp, close, sql } from './helpers.mjs';

const DELAY_MS = Number(process.env.WRITE_DELAY_MS);

test('a change waits for the write delay and takes what came meanwhile along', async () => {
  assert.ok(DELAY_MS > 0, 'WRITE_DELAY_MS must be set');
  const { app, socket } = socketApp(['websocket']);
  await new Promise((resolve) => socket.once('connect', resolve));
  const messages = app.service('messages');
  const texts = [];
  const both = new Promise((resolve) => {
    messages.on('created', (message) => {
      texts.push(message.text);
      if (texts.length === 2) resolve();
    });
  });
  try {
    const start = performance.now();
    await sql("INSERT INTO messages (text) VALUES ('held')");
    await sql("INSERT INTO messages (text) VALUES ('with it')");
    await both;
    assert.ok(performance.now() - start >= DELAY_MS, 'a change went out before the delay');
    assert.deepEqual(texts, ['held', 'with it']);
  } finally {
    close(socket);
  }
});
