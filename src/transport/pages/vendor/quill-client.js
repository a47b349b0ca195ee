// quill's `/ws` client: calls, subscriptions that resume after a disconnect, and replicas
// (a local copy of the rows that match a query, kept exactly in sync). No dependencies:
// it needs only a WebSocket (the browser's, Node 22's, or Node 20's with
// --experimental-websocket; or pass one in `options.WebSocket`).
/** A Feathers error as quill sends it, thrown by calls. */
export class QuillError extends Error {
    code;
    className;
    data;
    constructor(error) {
        super(error.message ?? 'quill error');
        this.name = error.name ?? 'QuillError';
        this.code = error.code ?? 500;
        this.className = error.className ?? 'general-error';
        this.data = error.data;
    }
}
/** quill's close codes (see its README). */
const CLOSE_RELOAD = 4010;
/** How soon a request refused with 503 (not ready yet) is sent again. */
const RETRY_MS = 500;
const OPEN = 1;
/** Opens a connection to quill's `/ws` (`ws://host:port/ws`, or an `http(s)://` base URL). */
export function connect(url, options = {}) {
    return new Client(url, options);
}
export class Client {
    url;
    #options;
    #socket = null;
    #nextRef = 1;
    #pending = new Map();
    /** Requests waiting for the socket (and the login), by ref. */
    #queue = [];
    #subscribers = new Map();
    #attempt = 0;
    #closed = false;
    #token;
    #stateListeners = new Set();
    #retry = null;
    /** Open and logged in: requests go out at once, else they are queued. */
    #ready = false;
    /** Subscribers whose subscribe reply has not been read yet. */
    #awaitingReply = new Set();
    /** Resolves when the connection is open (and logged in, with a token). */
    #opened;
    #markOpen = () => { };
    constructor(url, options) {
        this.url = wsUrl(url);
        this.#options = options;
        this.#token = options.token;
        this.#opened = new Promise((resolve) => (this.#markOpen = resolve));
        this.#open();
    }
    /** A service's six methods. */
    service(name) {
        return new ServiceClient(this, name);
    }
    /** Subscribes to a service's events; the subscription resumes after reconnects. */
    subscribe(service, options, listener) {
        const subscription = new Subscription(this, service, options, listener);
        this.#attach(service, subscription);
        return subscription;
    }
    /** A local copy of the rows of `service` that match `query`, kept in sync. */
    replica(service, options = {}) {
        const replica = new Replica(this, service, options);
        this.#attach(service, replica);
        return replica;
    }
    /** Logs the connection in (and again after every reconnect). */
    async authenticate(token) {
        this.#token = token;
        const { result } = await this.call('create', 'authentication', { data: { strategy: 'jwt', accessToken: token } });
        return result;
    }
    /** Notified when the connection opens or drops; returns a function that stops it. */
    onState(listener) {
        this.#stateListeners.add(listener);
        return () => this.#stateListeners.delete(listener);
    }
    /** Sends one call and resolves with its result (and txid, for a write). */
    async call(method, service, args = {}) {
        const frame = await this.#request({ method, service, ...args });
        if (frame.error)
            throw new QuillError(frame.error);
        return { result: frame.result, txid: frame.txid };
    }
    /** Closes the connection for good. */
    close() {
        this.#closed = true;
        if (this.#retry)
            clearTimeout(this.#retry);
        this.#socket?.close(1000, 'client closed');
        this.#failPending(new Error('the client was closed'));
    }
    /** @internal */
    detach(service, subscriber) {
        if (this.#subscribers.get(service) !== subscriber)
            return;
        this.#subscribers.delete(service);
        this.call('unsubscribe', service).catch(() => { });
    }
    /**
     * Sends a request frame and resolves with its reply frame. `onReply` runs as the reply
     * is read, before any later frame (a promise callback may run after several frames).
     */
    #request(body, onReply) {
        if (this.#closed)
            return Promise.reject(new Error('the client was closed'));
        const ref = this.#nextRef++;
        const text = JSON.stringify({ ref, ...body });
        return new Promise((resolve, reject) => {
            const timeout = this.#options.timeout ?? 30_000;
            const timer = setTimeout(() => {
                this.#pending.delete(ref);
                // Failed: it must not go out later, when the app may have retried it.
                this.#queue = this.#queue.filter((q) => q.ref !== ref);
                reject(new QuillError({ name: 'Timeout', message: `no reply within ${timeout} ms`, code: 408, className: 'timeout' }));
            }, timeout);
            this.#pending.set(ref, {
                resolve: (reply) => {
                    onReply?.(reply);
                    resolve(reply);
                },
                reject,
                timer
            });
            if (this.#ready && this.#socket?.readyState === OPEN)
                this.#socket.send(text);
            else
                this.#queue.push({ ref, text });
        });
    }
    /** @internal Sends a request frame without waiting for the reply (replies route by ref). */
    sendSubscribe(service, subscriber) {
        this.#awaitingReply.add(subscriber);
        this.#request(subscriber.request(), (reply) => {
            this.#awaitingReply.delete(subscriber);
            // A later subscribe to the service replaced this one meanwhile: ignore.
            if (this.#subscribers.get(service) === subscriber)
                subscriber.subscribed(reply);
        }).catch(() => {
            // Lost with the connection (sent again on the next one) or timed out: frames that
            // follow are this subscription's, whatever became of the reply.
            this.#awaitingReply.delete(subscriber);
        });
    }
    /** @internal */
    waitOpen() {
        return this.#opened;
    }
    #attach(service, subscriber) {
        const previous = this.#subscribers.get(service);
        if (previous && previous !== subscriber)
            previous.disconnected(false);
        this.#subscribers.set(service, subscriber);
        this.sendSubscribe(service, subscriber);
    }
    #open() {
        const Socket = this.#options.WebSocket ?? globalThis.WebSocket;
        if (!Socket)
            throw new Error('no WebSocket: pass options.WebSocket (Node 20: node --experimental-websocket)');
        this.#emit('connecting');
        const socket = new Socket(this.url);
        this.#socket = socket;
        // An attempt that neither opens nor fails (a black-holed network) is given up.
        const connecting = setTimeout(() => {
            socket.onopen = socket.onclose = socket.onmessage = null;
            try {
                socket.close();
            }
            catch {
                // still connecting: nothing to close cleanly
            }
            this.#lost(socket, 1006);
        }, this.#options.connectTimeout ?? 10_000);
        socket.onopen = () => {
            clearTimeout(connecting);
            this.#attempt = 0;
            // Queued requests (subscriptions first) go out once logged in, in order: quill runs
            // calls concurrently, so a subscribe sent beside the login could run before it.
            const flush = () => {
                if (this.#socket !== socket)
                    return;
                this.#ready = true;
                const queued = this.#queue;
                this.#queue = [];
                for (const { text } of queued)
                    socket.send(text);
                this.#emit('open');
                this.#markOpen();
            };
            if (!this.#token)
                return flush();
            const ref = this.#nextRef++;
            const timer = setTimeout(() => socket.close(4000, 'login timed out'), this.#options.timeout ?? 30_000);
            this.#pending.set(ref, {
                resolve: (reply) => {
                    // A refused token still lets anonymous calls through; they fail on their own.
                    if (reply.error)
                        this.#token = undefined;
                    flush();
                },
                reject: () => { },
                timer
            });
            socket.send(JSON.stringify({ ref, method: 'create', service: 'authentication', data: { strategy: 'jwt', accessToken: this.#token } }));
        };
        socket.onmessage = (message) => {
            if (typeof message.data !== 'string')
                return;
            let frame;
            try {
                frame = JSON.parse(message.data);
            }
            catch {
                return;
            }
            if (typeof frame.event === 'string') {
                const subscriber = typeof frame.service === 'string' ? this.#subscribers.get(frame.service) : undefined;
                // Until its reply, frames of the service are an earlier subscription's (one that
                // was replaced, e.g. another room): never this one's.
                if (subscriber && !this.#awaitingReply.has(subscriber))
                    subscriber.frame(frame);
                return;
            }
            const pending = typeof frame.ref === 'number' ? this.#pending.get(frame.ref) : undefined;
            if (pending) {
                this.#pending.delete(frame.ref);
                clearTimeout(pending.timer);
                pending.resolve(frame);
            }
        };
        socket.onerror = () => { };
        socket.onclose = (event) => {
            clearTimeout(connecting);
            this.#lost(socket, event.code);
        };
    }
    /** The socket closed (or never opened): fail what was in flight, then reconnect. */
    #lost(socket, code) {
        if (this.#socket !== socket)
            return;
        this.#socket = null;
        this.#ready = false;
        this.#opened = new Promise((resolve) => (this.#markOpen = resolve));
        // Calls in flight may or may not have happened: their callers decide.
        this.#failPending(new QuillError({ name: 'Unavailable', message: `connection closed (${code})`, code: 503, className: 'unavailable' }));
        const reload = code === CLOSE_RELOAD;
        for (const subscriber of this.#subscribers.values())
            subscriber.disconnected(reload);
        this.#emit('closed');
        if (this.#closed)
            return;
        const { min = 100, max = 10_000 } = this.#options.backoff ?? {};
        const delay = Math.random() * Math.min(max, min * 2 ** this.#attempt);
        this.#attempt = Math.min(this.#attempt + 1, 30);
        this.#retry = setTimeout(() => {
            this.#retry = null;
            if (this.#closed)
                return;
            // Subscriptions go first on the new socket, each from where it stopped, then the
            // calls made meanwhile (a `sync` needs its subscription).
            const meanwhile = this.#queue;
            this.#queue = [];
            for (const [service, subscriber] of this.#subscribers)
                this.sendSubscribe(service, subscriber);
            this.#queue.push(...meanwhile);
            this.#open();
        }, delay);
    }
    #failPending(error) {
        for (const pending of this.#pending.values()) {
            clearTimeout(pending.timer);
            pending.reject(error);
        }
        this.#pending.clear();
        this.#queue = [];
    }
    #emit(state) {
        for (const listener of this.#stateListeners)
            listener(state);
    }
}
/** A service's methods over the connection. */
export class ServiceClient {
    client;
    name;
    constructor(client, name) {
        this.client = client;
        this.name = name;
    }
    async find(query = {}) {
        return (await this.client.call('find', this.name, { query })).result;
    }
    async get(id, query) {
        return (await this.client.call('get', this.name, { id, query })).result;
    }
    create(data, query) {
        return this.client.call('create', this.name, { data, query });
    }
    update(id, data, query) {
        return this.client.call('update', this.name, { id, data, query });
    }
    patch(id, data, query) {
        return this.client.call('patch', this.name, { id, data, query });
    }
    remove(id, query) {
        return this.client.call('remove', this.name, { id, query });
    }
}
/** Events of one service, resumed with `since` after every reconnect. */
export class Subscription {
    client;
    service;
    options;
    listener;
    #lastSeq = null;
    #closed = false;
    constructor(client, service, options, listener) {
        this.client = client;
        this.service = service;
        this.options = options;
        this.listener = listener;
    }
    /** The seq of the last event received (where a resume starts). */
    get lastSeq() {
        return this.#lastSeq;
    }
    request() {
        const { query, kinds } = this.options;
        return { method: 'subscribe', service: this.service, query, kinds, since: this.#lastSeq ?? undefined };
    }
    subscribed(reply) {
        const error = reply.error;
        if (error?.code === 410) {
            // Too far behind: start over from now, and let the app reload.
            this.#lastSeq = null;
            this.options.onReload?.();
            this.client.sendSubscribe(this.service, this);
        }
        else if (error?.code === 503) {
            // quill or its database is not ready: the same request again shortly.
            setTimeout(() => this.#closed || this.client.sendSubscribe(this.service, this), RETRY_MS);
        }
    }
    frame(frame) {
        if (typeof frame.seq === 'number')
            this.#lastSeq = frame.seq;
        this.listener(frame);
    }
    disconnected(reload) {
        if (reload) {
            this.#lastSeq = null;
            this.options.onReload?.();
        }
    }
    close() {
        this.#closed = true;
        this.client.detach(this.service, this);
    }
}
/**
 * A local copy of the rows of a service that match a query and that the connection may
 * see: a snapshot, then live changes, kept across reconnects (resumed from the last
 * position; a fresh snapshot when quill cannot resume, swapped in only once complete, so
 * the copy never flashes empty).
 */
export class Replica {
    client;
    service;
    options;
    ready;
    #rows = new Map();
    /** A snapshot being received: swapped in at its `synced`. */
    #staging = null;
    #lastSeq = null;
    #synced = false;
    #idColumn;
    #listeners = new Set();
    #put = new Set();
    #deleted = new Set();
    #waiting = new Map();
    #markReady = () => { };
    #failReady = () => { };
    #notifyScheduled = false;
    #closed = false;
    constructor(client, service, options) {
        this.client = client;
        this.service = service;
        this.options = options;
        this.#idColumn = options.id ?? 'id';
        this.ready = new Promise((resolve, reject) => {
            this.#markReady = resolve;
            this.#failReady = reject;
        });
        // A listener-less failure is reported through `ready` only when someone awaits it.
        this.ready.catch(() => { });
    }
    /** The rows, in no particular order. */
    get rows() {
        return [...this.#rows.values()];
    }
    get size() {
        return this.#rows.size;
    }
    get(id) {
        return this.#rows.get(normalizeId(id));
    }
    /** Whether the copy is complete (after the first `synced`, until a disconnect). */
    get synced() {
        return this.#synced;
    }
    /** Called at consistent points: after each `synced`, then after each burst of live changes. */
    onChange(listener) {
        this.#listeners.add(listener);
        return () => this.#listeners.delete(listener);
    }
    /** Resolves once the copy reflects transaction `txid` (a write reply's `txid`). */
    async waitFor(txid) {
        if (!txid)
            return;
        await this.ready;
        const done = new Promise((resolve, reject) => {
            const list = this.#waiting.get(txid) ?? [];
            list.push({ resolve, reject });
            this.#waiting.set(txid, list);
        });
        this.#askSync(txid);
        return done;
    }
    /** Writes through the service and resolves once the copy reflects the write. */
    async create(data) {
        const { result, txid } = await this.client.service(this.service).create(data);
        await this.waitFor(txid);
        return result;
    }
    async patch(id, data) {
        const { result, txid } = await this.client.service(this.service).patch(id, data);
        await this.waitFor(txid);
        return result;
    }
    async remove(id) {
        const { result, txid } = await this.client.service(this.service).remove(id);
        await this.waitFor(txid);
        return result;
    }
    close() {
        this.#closed = true;
        this.client.detach(this.service, this);
        this.#failWaiters(new Error('the replica was closed'));
    }
    request() {
        return {
            method: 'subscribe',
            service: this.service,
            query: this.options.query,
            snapshot: true,
            since: this.#lastSeq ?? undefined
        };
    }
    subscribed(reply) {
        const result = reply.result;
        if (result?.snapshot) {
            // A snapshot follows: collect it beside the copy until its synced.
            this.#staging = new Map();
        }
        else if (reply.error) {
            const error = new QuillError(reply.error);
            if (error.code === 503) {
                // The database or this instance is not ready: try again shortly.
                if (!this.#closed)
                    setTimeout(() => this.#closed || this.client.sendSubscribe(this.service, this), RETRY_MS);
            }
            else {
                // Refused (not allowed, a bad query, a token that expired): nothing is kept in
                // sync any more; whoever waits is told.
                this.#failReady(error);
                this.#failWaiters(error);
            }
        }
    }
    frame(frame) {
        const target = this.#staging ?? this.#rows;
        switch (frame.event) {
            case 'snapshot': {
                // A snapshot replaces the copy at its synced, even if its reply was missed.
                if (this.#staging === null)
                    this.#staging = new Map();
                for (const row of frame.rows)
                    this.#staging.set(this.#idOf(row), row);
                return;
            }
            case 'synced':
                if (typeof frame.txid === 'string')
                    return this.#txidSynced(frame.txid);
                this.#lastSeq = frame.seq;
                this.#complete();
                return;
            case 'created':
            case 'updated':
            case 'patched': {
                const row = frame.data;
                target.set(this.#idOf(row), row);
                this.#changed(this.#idOf(row), true);
                break;
            }
            case 'removed': {
                const id = this.#idOf(frame.data);
                target.delete(id);
                this.#changed(id, false);
                break;
            }
            case 'truncated':
                for (const id of target.keys())
                    this.#changed(id, false);
                target.clear();
                break;
            default:
                return;
        }
        // While a snapshot is collected, the copy's position stays where the copy is: a
        // disconnect now resumes the copy, not the half-received snapshot.
        if (typeof frame.seq === 'number' && this.#staging === null)
            this.#lastSeq = frame.seq;
        if (this.#synced)
            this.#scheduleNotify();
    }
    disconnected(reload) {
        // Keep showing the copy; it is behind until the next synced.
        this.#synced = false;
        this.#staging = null;
        if (reload)
            this.#lastSeq = null;
    }
    #complete() {
        const reset = this.#staging !== null;
        if (this.#staging) {
            for (const id of this.#rows.keys())
                if (!this.#staging.has(id))
                    this.#deleted.add(id);
            for (const id of this.#staging.keys())
                this.#put.add(id);
            this.#rows = this.#staging;
            this.#staging = null;
        }
        this.#synced = true;
        this.#markReady();
        this.#notify(reset);
        // Marks asked for before a reconnect are asked again on this subscription.
        for (const txid of this.#waiting.keys())
            this.#askSync(txid);
    }
    #txidSynced(txid) {
        // Changes up to the mark are applied: tell listeners first, then the waiters.
        this.#notify(false);
        const list = this.#waiting.get(txid);
        this.#waiting.delete(txid);
        for (const waiter of list ?? [])
            waiter.resolve();
    }
    #askSync(txid) {
        this.client.call('sync', this.service, { txid }).catch((error) => {
            if (this.#closed || !this.#waiting.has(txid))
                return;
            if (error instanceof QuillError && error.code === 503) {
                // Lost with the connection (asked again at the next synced) or the database is
                // down for a moment: ask again shortly either way.
                setTimeout(() => this.#synced && this.#waiting.has(txid) && this.#askSync(txid), RETRY_MS);
                return;
            }
            const list = this.#waiting.get(txid);
            this.#waiting.delete(txid);
            for (const waiter of list ?? [])
                waiter.reject(error);
        });
    }
    #failWaiters(error) {
        for (const list of this.#waiting.values())
            for (const waiter of list)
                waiter.reject(error);
        this.#waiting.clear();
    }
    #changed(id, put) {
        if (put) {
            this.#put.add(id);
            this.#deleted.delete(id);
        }
        else {
            this.#deleted.add(id);
            this.#put.delete(id);
        }
    }
    #scheduleNotify() {
        if (this.#notifyScheduled)
            return;
        this.#notifyScheduled = true;
        setTimeout(() => this.#notify(false), 0);
    }
    #notify(reset) {
        this.#notifyScheduled = false;
        if (!reset && this.#put.size === 0 && this.#deleted.size === 0)
            return;
        const change = { reset, put: [...this.#put], deleted: [...this.#deleted], rows: this.rows };
        this.#put.clear();
        this.#deleted.clear();
        for (const listener of this.#listeners)
            listener(change);
    }
    #idOf(row) {
        return normalizeId(row[this.#idColumn]);
    }
}
/** Ids compare by value: 7 and "7" are the same row. */
function normalizeId(id) {
    return typeof id === 'number' ? String(id) : id;
}
function wsUrl(url) {
    if (url.startsWith('http://') || url.startsWith('https://')) {
        const base = url.replace(/^http/, 'ws').replace(/\/$/, '');
        return `${base}/ws`;
    }
    return url;
}
