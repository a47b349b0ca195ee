// An idle Supabase socket stays open past quill's 60 s idle timeout, every Phoenix heartbeat
// is answered (realtime-js closes the socket when one is not), and it still delivers.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { Inbox, live, realtime, sql } from './helpers.mjs';

after(() => sql.end());

test('heartbeats are answered and keep a socket idle for more than 60 s open', async () => {
  const beats = new Inbox('heartbeats');
  const client = realtime(undefined, { heartbeatCallback: (status) => beats.push(status) });
  const events = new Inbox('events');
  const channel = client
    .channel('idle')
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'notes', filter: 'room=eq.idle' }, events.push);
  await live(channel);
  // 'sent' then 'ok' per beat, every 25 s: three answered beats span 75 s of silence
  // otherwise (quill's idle timeout is 60 s).
  await beats.until((b) => b.filter((s) => s === 'ok').length >= 3, 'three answered heartbeats', 90000);
  assert.deepEqual(
    beats.items.filter((s) => s !== 'sent' && s !== 'ok'),
    [],
    'every heartbeat got its ok',
  );
  assert.deepEqual(
    channel.states.items.map((s) => s.status).filter((s) => s !== 'SUBSCRIBED'),
    [],
    'the channel never errored or closed',
  );
  await sql.query("INSERT INTO notes (room, n) VALUES ('idle', 1)");
  await events.until((e) => e.length === 1);
  await client.removeAllChannels();
  client.disconnect();
});
