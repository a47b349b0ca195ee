// Shared helpers for the conformance tests: Feathers client apps pointed at quill.
import { feathers } from '@feathersjs/feathers';
import socketio from '@feathersjs/socketio-client';
import rest from '@feathersjs/rest-client';
import authentication, { MemoryStorage } from '@feathersjs/authentication-client';
import { io } from 'socket.io-client';
import pg from 'pg';

export const URL = process.env.QUILL_URL;
export const DATABASE_URL = process.env.DATABASE_URL;
if (!URL || !DATABASE_URL) {
  throw new Error('QUILL_URL and DATABASE_URL must be set (the Rust test harness sets them)');
}

/** A Feathers app over socket.io; transports: ['websocket'] or the default (polling first). */
export function socketApp(transports) {
  const socket = io(URL, { transports: transports ?? ['polling', 'websocket'], reconnectionDelay: 50 });
  const app = feathers();
  app.configure(socketio(socket, { timeout: 5000 }));
  // The default storage is one module-wide singleton: give every app its own token.
  app.configure(authentication({ storage: new MemoryStorage() }));
  return { app, socket };
}

/** Closes a socket for good (without the auth client re-authenticating on the way out). */
export function close(socket) {
  socket.removeAllListeners('disconnect');
  socket.disconnect();
}

/** A Feathers app over REST with fetch. */
export function restApp() {
  const app = feathers();
  app.configure(rest(URL).fetch(fetch));
  app.configure(authentication({ storage: new MemoryStorage() }));
  return app;
}

let counter = 0;
/** Signs a new user up and logs the app in; returns the user. */
export async function loggedIn(app, prefix = 'user') {
  counter += 1;
  const email = `${prefix}-${process.pid}-${counter}-${Date.now()}@example.com`;
  await app.service('users').create({ email, password: 'secret-pw' });
  const { user } = await app.authenticate({ strategy: 'local', email, password: 'secret-pw' });
  return user;
}

/** Resolves with the next `event` on `service` whose data passes `pred`. */
export function nextEvent(service, event, pred = () => true, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      service.removeListener(event, handler);
      reject(new Error(`no '${event}' event within ${ms} ms`));
    }, ms);
    function handler(data) {
      if (pred(data)) {
        clearTimeout(timer);
        service.removeListener(event, handler);
        resolve(data);
      }
    }
    service.on(event, handler);
  });
}

/** Collects every `event` on `service` for `ms` milliseconds. */
export async function eventsDuring(service, event, ms) {
  const seen = [];
  const handler = (data) => seen.push(data);
  service.on(event, handler);
  await new Promise((resolve) => setTimeout(resolve, ms));
  service.removeListener(event, handler);
  return seen;
}

/** Runs SQL on the same database, as another program would. */
export async function sql(text, values = []) {
  const client = new pg.Client({ connectionString: DATABASE_URL });
  await client.connect();
  try {
    return await client.query(text, values);
  } finally {
    await client.end();
  }
}
