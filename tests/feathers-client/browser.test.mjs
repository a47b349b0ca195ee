// The example pages in headless Chromium: the listener page shows the events another page
// causes by clicking, and never a password.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';
import { URL, sql } from './helpers.mjs';

let browser;
before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run']
  });
});
after(async () => browser?.close());

async function signUp(email, password) {
  const res = await fetch(`${URL}/users`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ email, password })
  });
  assert.equal(res.status, 201);
}

test('the listener page shows the users and messages events caused on the other page', async () => {
  const stamp = Date.now();
  const watcher = `watcher-${stamp}@example.com`;
  await signUp(watcher, 'watch-pw');

  const listener = await browser.newPage();
  await listener.goto(`${URL}/listener.html`);
  await listener.fill('#email', watcher);
  await listener.fill('#password', 'watch-pw');
  await listener.click('#login-button');
  await listener.waitForFunction(() => document.getElementById('status').textContent.startsWith('logged in'));

  const actor = await browser.newPage();
  await actor.goto(`${URL}/socketio.html`);
  const email = `actor-${stamp}@example.com`;
  await actor.fill('#email', email);
  await actor.fill('#password', 'actor-pw');
  await actor.click('#signup');
  await actor.waitForFunction(() => document.getElementById('out').textContent.includes('logged in'));
  for (const [button, done] of [
    ['#create-message', 'created message'],
    ['#patch-message', 'patched message'],
    ['#remove-message', 'removed message'],
    ['#patch-user', 'patched user']
  ]) {
    await actor.click(button);
    await actor.waitForFunction((d) => document.getElementById('out').textContent.includes(d), done);
  }
  // a write that never went through quill
  await sql("INSERT INTO messages (text) VALUES ('typed into psql')");

  const expected = ['users created', 'messages created', 'messages patched', 'messages removed', 'users patched', 'typed into psql'];
  await listener.waitForFunction(
    (lines) => lines.every((l) => document.getElementById('log').textContent.includes(l)),
    expected,
    { timeout: 10000 }
  );
  const log = await listener.textContent('#log');
  assert.ok(log.includes(email), 'the new user is shown');
  assert.ok(!log.includes('password') && !log.includes('actor-pw') && !log.includes('argon2'), log);
  assert.ok(!(await actor.textContent('#out')).includes('failed'), await actor.textContent('#out'));
});

test('an anonymous listener page shows nothing, and says why a bad login failed', async () => {
  const page = await browser.newPage();
  await page.goto(`${URL}/listener.html`);
  await sql("INSERT INTO messages (text) VALUES ('not for anonymous eyes')");
  await page.waitForTimeout(700);
  assert.equal(await page.textContent('#log'), '');
  await page.fill('#email', 'nobody@example.com');
  await page.fill('#password', 'wrong');
  await page.click('#login-button');
  await page.waitForFunction(() => document.getElementById('status').textContent.includes('NotAuthenticated'));
});
