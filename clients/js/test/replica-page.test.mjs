// /replica.html in headless Chromium (Debian's, through playwright-core): a live table of
// one user's messages that follows SQL writes, and catches up after quill is killed and
// started again. The Rust test `js_client` passes the quill binary, a fresh database, a
// free port and Chromium's path.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import pg from 'pg';
import { chromium } from 'playwright-core';

const { QUILL_BIN, DATABASE_URL, QUILL_PORT, CHROMIUM } = process.env;
if (!QUILL_BIN || !DATABASE_URL || !QUILL_PORT || !CHROMIUM) {
  throw new Error('QUILL_BIN, DATABASE_URL, QUILL_PORT and CHROMIUM must be set (the Rust test sets them)');
}
const URL = `http://127.0.0.1:${QUILL_PORT}`;
const db = new pg.Pool({ connectionString: DATABASE_URL, max: 2 });
const sql = (text, values) => db.query(text, values);

let quill = null;
const consoleLines = [];
let browser = null;
after(async () => {
  quill?.kill('SIGKILL');
  await browser?.close();
  await db.end();
});

/** Starts quill serving the demo on the port; resolves once it says it is serving. */
async function startQuill() {
  quill = spawn(QUILL_BIN, ['serve', '--database-url', DATABASE_URL, '--port', QUILL_PORT], {
    // A fixed secret: tokens stay valid across the restart, as in production.
    env: { ...process.env, QUILL_JWT_SECRET: 'replica-page-test-secret-0123456789abcdef', NO_COLOR: '1' },
    stdio: ['ignore', 'pipe', 'inherit']
  });
  const child = quill;
  let log = '';
  await new Promise((resolve, reject) => {
    child.stdout.on('data', (chunk) => {
      log += chunk;
      if (log.includes('quill is serving')) resolve();
    });
    child.once('exit', (code) => reject(new Error(`quill exited with ${code}:\n${log}`)));
  });
}

async function killQuill() {
  const exited = once(quill, 'exit');
  quill.kill('SIGKILL');
  await exited;
  quill = null;
}

/** The page's table as [id, text] pairs, and the database's, must be equal. */
async function tableMatches(page, user) {
  const { rows } = await sql('SELECT id::text, text FROM messages WHERE user_id = $1 ORDER BY id', [user]);
  const expected = rows.map((r) => [r.id, r.text]);
  const shown = async () => `status: ${await page.textContent('#status')}; table: ${await page.textContent('#rows')}; want: ${JSON.stringify(expected)}; console: ${consoleLines.join(' | ')}`;
  await page.waitForFunction(
    (want) => {
      const got = [...document.querySelectorAll('#rows tr')].map((tr) => [tr.children[0].textContent, tr.children[1].textContent]);
      return JSON.stringify(got) === JSON.stringify(want) && document.getElementById('status').textContent.includes('in sync');
    },
    expected,
    { timeout: 15000 }
  ).catch(async (e) => {
    throw new Error(`${e.message}\n${await shown()}`);
  });
}

test('the replica page follows SQL writes and catches up after quill is killed and restarted', { timeout: 120000 }, async () => {
  await startQuill();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run']
  });
  for (const email of ['reader@example.com', 'other@example.com']) {
    const res = await fetch(`${URL}/users`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ email, password: 'reader-pw' })
    });
    assert.equal(res.status, 201);
  }
  const { rows: [reader, other] } = await sql("SELECT id FROM users ORDER BY id");
  await sql("INSERT INTO messages (text, user_id) VALUES ('before', $1), ('not mine', $2)", [reader.id, other.id]);

  const page = await browser.newPage();
  page.on('console', (m) => consoleLines.push(m.text()));
  page.on('pageerror', (e) => consoleLines.push(`error: ${e.message}`));
  await page.goto(`${URL}/replica.html`);
  await page.fill('#email', 'reader@example.com');
  await page.fill('#password', 'reader-pw');
  await page.click('#login-button');
  await tableMatches(page, reader.id);

  // Plain SQL, as psql would: in, edited, moved away, moved here, removed.
  await sql("INSERT INTO messages (text, user_id) VALUES ('typed in psql', $1), ('also theirs', $2)", [reader.id, other.id]);
  await sql("UPDATE messages SET text = 'edited' WHERE text = 'before'");
  await sql("UPDATE messages SET user_id = $1 WHERE text = 'not mine'", [reader.id]);
  await tableMatches(page, reader.id);

  await killQuill();
  await page.waitForFunction(() => !document.getElementById('status').textContent.includes('; open;'));
  await sql("INSERT INTO messages (text, user_id) SELECT 'while quill was down ' || g, $1 FROM generate_series(1, 3) g", [reader.id]);
  await sql("DELETE FROM messages WHERE text = 'edited'");
  await sql("UPDATE messages SET user_id = $1 WHERE text = 'not mine'", [other.id]);
  await startQuill();
  await tableMatches(page, reader.id);
  const table = await page.textContent('#rows');
  assert.ok(!table.includes('also theirs') && !table.includes('not mine'), table);
});
