// Shared helpers: Supabase clients pointed at quill, tokens, SQL, waiting for signals.
import { createHmac } from 'node:crypto';
import { createClient } from '@supabase/supabase-js';
import { RealtimeClient } from '@supabase/realtime-js';
import WebSocket from 'ws';
import pg from 'pg';

export const URL = process.env.QUILL_URL;
export const DATABASE_URL = process.env.DATABASE_URL;
export const ANON_KEY = process.env.ANON_KEY;
const SECRET = process.env.JWT_SECRET;
const AUDIENCE = process.env.JWT_AUDIENCE;
const ISSUER = process.env.JWT_ISSUER;
if (!URL || !DATABASE_URL || !ANON_KEY || !SECRET) {
  throw new Error('QUILL_URL, DATABASE_URL, ANON_KEY and JWT_SECRET must be set (the Rust test harness sets them)');
}
export const WS_URL = URL.replace(/^http/, 'ws');

/** An HS256 JWT with these claims. */
export function jwt(claims, secret = SECRET) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const unsigned = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`;
}

const now = () => Math.floor(Date.now() / 1000);
/** An anon key valid for `seconds` (negative: already expired). */
export const anonKey = (seconds = 3600) => jwt({ iss: ISSUER, aud: AUDIENCE, role: 'anon', iat: now(), exp: now() + seconds });

/** supabase-js as an app uses it: createClient(url, key), WebSocket from `ws` on Node 20. */
export function supabase(key = ANON_KEY, options = {}) {
  return createClient(URL, key, {
    auth: { persistSession: false, autoRefreshToken: false },
    realtime: { transport: WebSocket, ...options },
  });
}

/** A bare realtime-js client (its own socket). */
export function realtime(key = ANON_KEY, options = {}) {
  return new RealtimeClient(`${WS_URL}/realtime/v1`, { params: { apikey: key }, transport: WebSocket, ...options });
}

export const sql = new pg.Pool({ connectionString: DATABASE_URL, max: 4 });

let counter = 0;
/** Signs a user up and logs in over REST: `{id, token}`. */
export async function user(prefix = 'sb') {
  counter += 1;
  const email = `${prefix}-${process.pid}-${counter}-${Date.now()}@example.com`;
  const post = (path, body) =>
    fetch(`${URL}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })
      .then(async (r) => {
        if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
        return r.json();
      });
  const created = await post('/users', { email, password: 'secret-pw' });
  const { accessToken } = await post('/authentication', { strategy: 'local', email, password: 'secret-pw' });
  return { id: created.id, token: accessToken };
}

/** Resolves when `pred()` holds, checked after every event `arrived()` announces. */
export class Inbox {
  constructor(name) {
    this.name = name;
    this.items = [];
    this.waiters = [];
  }
  push = (item) => {
    this.items.push(item);
    for (const w of [...this.waiters]) w();
  };
  /** Waits until `pred(items)` holds (signals, not time: the timeout only reports a hang). */
  until(pred, what = 'the expected events', ms = 10000) {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (pred(this.items)) {
          this.waiters = this.waiters.filter((w) => w !== check);
          clearTimeout(timer);
          resolve(this.items);
          return true;
        }
        return false;
      };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== check);
        reject(new Error(`${this.name}: no ${what} within ${ms} ms; got ${JSON.stringify(this.items)}`));
      }, ms);
      if (!check()) this.waiters.push(check);
    });
  }
}

/**
 * Subscribes a channel and resolves once it is live: `SUBSCRIBED`, and with
 * postgres_changes bindings also the `system` "Subscribed to PostgreSQL".
 * Rejects on CHANNEL_ERROR, TIMED_OUT or a `system` error.
 */
export function live(channel, { pg: hasBindings = true } = {}) {
  return new Promise((resolve, reject) => {
    let subscribed = false;
    let feed = !hasBindings;
    channel.on('system', {}, (m) => {
      if (m.extension !== 'postgres_changes') return;
      if (m.status === 'ok') {
        feed = true;
        if (subscribed) resolve(channel);
      } else {
        reject(new Error(`system error: ${m.message}`));
      }
    });
    // Every status the channel reports, for later checks (a channel subscribes once).
    channel.states = new Inbox('statuses');
    channel.subscribe((status, err) => {
      channel.states.push({ status, message: err?.message });
      if (status === 'SUBSCRIBED') {
        subscribed = true;
        if (feed) resolve(channel);
      } else if (status === 'CHANNEL_ERROR' || status === 'TIMED_OUT') {
        reject(err ?? new Error(status));
      }
    });
  });
}

/** The statuses a channel reports, as an inbox (subscribes it: once per channel). */
export function statuses(channel, inbox = new Inbox('statuses')) {
  channel.subscribe((status, err) => inbox.push({ status, message: err?.message }));
  return inbox;
}

/** Supabase's commit_timestamp of the newest logged change to a table, read from the log. */
export async function loggedAt(table) {
  const { rows } = await sql.query(
    `SELECT to_char(changed_at AT TIME ZONE 'utc', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS at
       FROM quill.change_log WHERE table_name = $1 ORDER BY seq DESC LIMIT 1`,
    [table],
  );
  return rows[0].at;
}
