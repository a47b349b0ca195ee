// A TRUNCATE reaches Feathers clients as a `truncated` event on the service, with `{}`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { socketApp, close, nextEvent, sql } from './helpers.mjs';

test('a Feathers client hears of a TRUNCATE as the truncated event', async () => {
  const { app, socket } = socketApp(['websocket']);
  await new Promise((resolve) => socket.once('connect', resolve));
  const messages = app.service('messages');
  const truncated = nextEvent(messages, 'truncated');
  await sql('TRUNCATE messages');
  assert.deepEqual(await truncated, {});
  close(socket);
});
