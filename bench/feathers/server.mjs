// A Feathers v5 server with quill's demo tables and policy, built the way the Feathers guide
// builds its chat app (koa + socket.io + knex on PostgreSQL): the peer that compare.mjs
// measures quill against.
//
//   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres PORT=3031 node server.mjs
//
// Prints `listening <port>` once it serves; logs nothing per request.
import { once } from 'node:events';
import fs from 'node:fs';
import { feathers } from '@feathersjs/feathers';
import { koa, rest, bodyParser, errorHandler } from '@feathersjs/koa';
import socketio from '@feathersjs/socketio';
import { KnexService } from '@feathersjs/knex';
import { AuthenticationService, JWTStrategy, authenticate } from '@feathersjs/authentication';
import { LocalStrategy, passwordHash, hooks as localHooks } from '@feathersjs/authentication-local';
import { resolve, hooks as schemaHooks } from '@feathersjs/schema';
import knex from 'knex';
import pg from 'pg';

const DATABASE_URL = process.env.DATABASE_URL;
const PORT = Number(process.env.PORT ?? 3030);
const SECRET = process.env.FEATHERS_SECRET ?? 'feathers peer bench secret: only for throwaway servers';
// quill's own demo tables, so that both servers store and send the same rows.
const TABLES_SQL = new URL('../../migrations/demo/20261128100001_demo_tables.sql', import.meta.url);

if (!DATABASE_URL) {
  console.error('DATABASE_URL must be set');
  process.exit(2);
}

// The ids are bigint; node-postgres returns those as strings. quill sends JSON numbers, so
// parse them as numbers here too and both servers send rows of the same shape.
pg.types.setTypeParser(pg.types.builtins.INT8, Number);

const db = knex({ client: 'pg', connection: DATABASE_URL, pool: { min: 0, max: 16 } }); // quill's pool_size
await db.raw(fs.readFileSync(TABLES_SQL, 'utf8'));

const app = koa(feathers());
app.use(errorHandler());
app.use(bodyParser());
app.configure(rest());
app.configure(socketio());

app.set('authentication', {
  entity: 'user',
  service: 'users',
  secret: SECRET,
  authStrategies: ['jwt', 'local'],
  jwtOptions: { header: { typ: 'access' }, audience: 'feathers-peer-bench', algorithm: 'HS256', expiresIn: '1d' },
  local: { usernameField: 'email', passwordField: 'password' },
});
const authentication = new AuthenticationService(app);
authentication.register('jwt', new JWTStrategy());
authentication.register('local', new LocalStrategy());
app.use('authentication', authentication);

const paginate = { default: 10, max: 50 }; // quill's default page sizes
app.use('users', new KnexService({ Model: db, name: 'users', paginate }));
app.use('messages', new KnexService({ Model: db, name: 'messages', paginate }));

const hashPassword = schemaHooks.resolveData(resolve({ password: passwordHash({ strategy: 'local' }) }));
app.service('users').hooks({
  around: {
    find: [authenticate('jwt')],
    get: [authenticate('jwt')],
    update: [authenticate('jwt')],
    patch: [authenticate('jwt')],
    remove: [authenticate('jwt')],
  },
  before: { create: [hashPassword], update: [hashPassword], patch: [hashPassword] },
  after: { all: [localHooks.protect('password')] },
});

// The author is whoever is logged in, whatever the client sends; created_at is the
// column's default.
const stampAuthor = schemaHooks.resolveData(resolve({ user_id: async (_value, _message, context) => context.params.user.id }));
app.service('messages').hooks({
  around: { all: [authenticate('jwt')] },
  before: { create: [stampAuthor] },
});

// The guide's channels: a connection is anonymous until it logs in, and every service
// event goes to the logged-in ones.
app.on('connection', (connection) => app.channel('anonymous').join(connection));
app.on('login', (_authResult, { connection }) => {
  if (connection) {
    app.channel('anonymous').leave(connection);
    app.channel('authenticated').join(connection);
  }
});
app.publish(() => app.channel('authenticated'));

const server = await app.listen(PORT, '127.0.0.1');
if (!server.listening) await once(server, 'listening');
console.log(`listening ${PORT}`);
