// The {{name}} connector: tells a legacy system about Lockstep session events.
//
// A hook that returns succeeds; `throw new Retry(msg)` when trying again can help (the peer
// is down, timed out or answered 5xx), `throw new Fail(msg)` when it cannot (bad
// configuration, 4xx). Hooks you leave out do nothing. See src/lockstep.ts for the SDK.

import { connector, config, log, request, pathSegment } from "./lockstep";

export const hooks = connector({
  async onLogin(event) {
    const response = await request(`${config.require("base_url")}/sessions`, {
      method: "POST",
      headers: { authorization: config.require("authorization") },
      json: {
        sessionId: event.externalId,
        userId: event.userId ?? null,
        realm: event.realm,
        idpSessionId: event.idpSessionId ?? null,
      },
    });
    // 409: already there (delivery is at least once).
    if (response.status !== 201 && response.status !== 409) throw response.error();
    log.info(`created legacy session ${event.externalId}`);
  },

  async onLogout(event) {
    const url = `${config.require("base_url")}/sessions/${pathSegment(event.externalId)}`;
    const response = await request(url, {
      method: "DELETE",
      headers: { authorization: config.require("authorization") },
    });
    // 404: already gone.
    if (response.status !== 204 && response.status !== 404) throw response.error();
    log.info(`ended legacy session ${event.externalId}`);
  },
});
