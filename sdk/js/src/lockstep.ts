// Lockstep connector SDK for JavaScript and TypeScript (lockstep:connector@0.3.0).
//
// `lockstep connector new --lang js` copies this file into your project as src/lockstep.ts;
// `lockstep connector build` bundles it with your code (esbuild) and turns the bundle into a
// WebAssembly component (componentize-js). Write your hooks with `connector({...})`: a hook
// that returns (or resolves) succeeds; `throw new Retry(msg)` asks the host to try again
// later (the legacy system is down, timed out, answered 5xx); `throw new Fail(msg)` fails
// for good (bad configuration, 4xx). Any other exception becomes a `fail` with its message,
// never a trap, so a bug costs one dead letter you can replay, not a crashed instance.

import {
  cacheGet,
  cacheSet,
  configGet,
  log as hostLog,
} from "lockstep:connector/host@0.3.0";
import { signEvent as hostSignEvent } from "lockstep:connector/signing@0.3.0";

/** What happened to the session. */
export type EventType = "login" | "logout" | "revoke" | "refresh";
/** How the session hangs in its tree. */
export type SessionKind = "parent" | "child" | "fixed";

/** One change to one session. `eventId` is stable across redeliveries: delivery is at least
 * once, so de-duplicate by it. Times are RFC 3339, UTC. */
export interface SessionEvent {
  eventId: string;
  eventType: EventType;
  realm: string;
  externalId: string;
  kind: SessionKind;
  idpSessionId?: string;
  idpClientSessionId?: string;
  userId?: string;
  /** The system that owns the session. */
  system?: string;
  /** The system the change came from (never this connector). */
  originSystem?: string;
  /** logout, admin, idp_logout, expired, cascade, delegation_ended or revoked. */
  endReason?: string;
  attributes: [string, string][];
  occurredAt: string;
  /** When the session expires, if known; on a refresh, the new expiry. */
  expiresAt?: string;
}

/** Throw to ask the host for a retry (per the connector's failure policy). */
export class Retry extends Error {
  constructor(message: string) {
    super(message);
    this.name = "Retry";
  }
}

/** Throw to fail the delivery for good (no retry). */
export class Fail extends Error {
  constructor(message: string) {
    super(message);
    this.name = "Fail";
  }
}

/** A hook: return (or resolve) for success, throw `Retry` or `Fail` otherwise. */
export type Hook = (event: SessionEvent) => void | Promise<void>;

/** The hooks you implement; the ones you leave out succeed without doing anything. */
export interface Hooks {
  onLogin?: Hook;
  onLogout?: Hook;
  revoke?: Hook;
  /** Called only if the manifest lists `refresh` in `events`. */
  onRefresh?: Hook;
}

type HookError = { tag: "retry" | "fail"; val: string };

/** The component-model error for whatever a hook threw. */
function hookError(e: unknown): HookError {
  if (e instanceof Retry) return { tag: "retry", val: e.message };
  if (e instanceof Fail) return { tag: "fail", val: e.message };
  const message = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  return { tag: "fail", val: `unexpected error: ${message}` };
}

function wrap(hook: Hook | undefined): (event: SessionEvent) => Promise<void> {
  return async (event) => {
    if (hook === undefined) return;
    try {
      await hook(event);
    } catch (e) {
      throw hookError(e);
    }
  };
}

/** Turns your hooks into the `hooks` export the host calls:
 * `export const hooks = connector({ async onLogin(event) { ... } });` */
export function connector(hooks: Hooks) {
  return {
    onLogin: wrap(hooks.onLogin),
    onLogout: wrap(hooks.onLogout),
    revoke: wrap(hooks.revoke),
    onRefresh: wrap(hooks.onRefresh),
  };
}

/** The manifest's `[config]` table. */
export const config = {
  /** A value, or `undefined`. */
  get(key: string): string | undefined {
    return configGet(key);
  },
  /** A value, or a `Fail` naming the missing key. */
  require(key: string): string {
    const value = configGet(key);
    if (value === undefined || value === "") {
      throw new Fail(`missing config key ${key} (set it in the manifest's [config])`);
    }
    return value;
  },
};

/** Lines in the host's log, tagged with the connector and event (at most 100 per call). */
export const log = {
  trace: (message: string) => hostLog("trace", message),
  debug: (message: string) => hostLog("debug", message),
  info: (message: string) => hostLog("info", message),
  warn: (message: string) => hostLog("warn", message),
  error: (message: string) => hostLog("error", message),
};

/** Signed events: the event of the current hook call as a Security Event Token (RFC 8417)
 * that Lockstep signs with its Shared Signals transmitter key; receivers verify it with
 * Lockstep's public JWKS. The key never enters the component, and the host builds the token
 * from the event being delivered: you choose only the audience (`aud`). */
export const signing = {
  /** The media type of a SET in an HTTP body. */
  contentType: "application/secevent+jwt",
  /** The compact JWS of the SET about the current event for `audience`; the same `jti` on
   * every redelivery. Throws `Fail` when the host signs nothing (no transmitter configured,
   * a bad audience, more than four calls in one hook). */
  signEvent(audience: string): string {
    try {
      return hostSignEvent(audience);
    } catch (e) {
      const reason =
        typeof e === "object" && e !== null && "payload" in e ? String(e.payload) : String(e);
      throw new Fail(`signing the event failed: ${reason}`);
    }
  },
};

/** A small in-memory store per connector version that outlives one call (an access token):
 * at most 64 entries, 256-byte keys, 16 KiB values, 24 h. */
export const cache = {
  get(key: string): string | undefined {
    return cacheGet(key);
  },
  set(key: string, value: string, ttlMs: number): void {
    cacheSet(key, value, BigInt(Math.max(0, Math.floor(ttlMs))));
  },
};

/** A response with its body read. */
export class HttpResponse {
  constructor(
    readonly status: number,
    readonly text: string,
  ) {}

  /** The body parsed as JSON. */
  json<T = unknown>(): T {
    return JSON.parse(this.text) as T;
  }

  /** The error this status deserves: 5xx, 408 and 429 are worth a retry, others are not. */
  error(): Retry | Fail {
    const message = `HTTP ${this.status}: ${this.text.slice(0, 200)}`;
    return this.status >= 500 || this.status === 408 || this.status === 429
      ? new Retry(message)
      : new Fail(message);
  }
}

/** Options of `request`. */
export interface RequestOptions {
  method?: string;
  headers?: Record<string, string>;
  /** A string body, sent as is. */
  body?: string;
  /** A value sent as JSON (sets content-type). */
  json?: unknown;
}

/** An HTTP request over wasi:http, to a host the manifest's `allowed_hosts` allows. A network
 * failure (refused, reset, timeout, or a destination the host refused: the host log names it)
 * throws `Retry`; any status comes back as an `HttpResponse` (use `.error()` for the ones you
 * do not expect). */
export async function request(url: string, options: RequestOptions = {}): Promise<HttpResponse> {
  const method = options.method ?? "GET";
  const headers: Record<string, string> = { ...(options.headers ?? {}) };
  let body = options.body;
  if (options.json !== undefined) {
    body = JSON.stringify(options.json);
    headers["content-type"] ??= "application/json";
  }
  let response: Response;
  try {
    response = await fetch(url, { method, headers, body });
  } catch (e) {
    const reason = e instanceof Error ? e.message : String(e);
    throw new Retry(`${method} ${url}: ${reason}`);
  }
  return new HttpResponse(response.status, await response.text());
}

/** `Basic base64(user:password)`, for legacy systems with HTTP Basic auth. */
export function basicAuth(user: string, password: string): string {
  return `Basic ${btoa(`${user}:${password}`)}`;
}

/** `text` percent-encoded for a URL path segment. */
export function pathSegment(text: string): string {
  return encodeURIComponent(text);
}
