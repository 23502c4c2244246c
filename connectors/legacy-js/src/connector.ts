// Example connector (TypeScript): mirrors Lockstep sessions into a legacy IAM system's session
// table (tests/legacy-sim) behind its REST API and HTTP Basic auth. connectors/legacy-rust and
// connectors/legacy-python do exactly the same.
//
// - login: POST /api/v1/sessions; 201, or 409 (already there: delivery is at least once).
// - logout: DELETE /api/v1/sessions/{externalId}; 204, or 404 (already gone).
// - revoke: DELETE /api/v1/users/{userId}/sessions.
// Network failures, 5xx, 408 and 429 ask for a retry; any other status fails.
// Config: base_url, username, password (required).
//
// A project made by `lockstep connector new --lang js` carries its own copy of the SDK
// (src/lockstep.ts); this example uses the repository's.

import {
  basicAuth,
  config,
  connector,
  log,
  pathSegment,
  request,
  type HttpResponse,
} from "../../../sdk/js/src/lockstep";

function url(path: string): string {
  return `${config.require("base_url").replace(/\/+$/, "")}${path}`;
}

function auth(): Record<string, string> {
  return { authorization: basicAuth(config.require("username"), config.require("password")) };
}

function expect(response: HttpResponse, ...ok: number[]): void {
  if (!ok.includes(response.status)) throw response.error();
}

export const hooks = connector({
  async onLogin(event) {
    const response = await request(url("/api/v1/sessions"), {
      method: "POST",
      headers: auth(),
      json: {
        sessionId: event.externalId,
        userId: event.userId ?? null,
        realm: event.realm,
        idpSessionId: event.idpSessionId ?? null,
      },
    });
    expect(response, 201, 409);
    log.info(`created legacy session ${event.externalId}`);
  },

  async onLogout(event) {
    const response = await request(url(`/api/v1/sessions/${pathSegment(event.externalId)}`), {
      method: "DELETE",
      headers: auth(),
    });
    expect(response, 204, 404);
    log.info(`deleted legacy session ${event.externalId}`);
  },

  async revoke(event) {
    if (event.userId === undefined) return; // no user: nothing the legacy system can revoke
    const response = await request(url(`/api/v1/users/${pathSegment(event.userId)}/sessions`), {
      method: "DELETE",
      headers: auth(),
    });
    if (response.status < 200 || response.status > 299) throw response.error();
    log.info(`revoked the legacy sessions of ${event.userId}`);
  },
});
